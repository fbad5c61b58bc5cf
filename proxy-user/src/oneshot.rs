//! The commands that do one thing and exit: `inspect`, `cleanup` and `validate`.

use std::path::Path;

use anyhow::Context as _;
use extproxy::{
    bpffs::Lifetime,
    diag, inspect, lock,
    manifest::ManifestSet,
    pins, state,
    translate::{self, ClaimPolicy, NodeInfo},
};

use crate::{
    cli::{ConvertArgs, InspectArgs, ValidateArgs},
    run::manifest_mode::{print_summary, settings},
};

pub fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let report = inspect::collect(&args.pin_dir, &args.state_dir).with_context(|| {
        let why =
            why_nothing_is_seen(&args.pin_dir).unwrap_or_else(|| "is extproxy running?".to_owned());
        format!(
            "reading the maps pinned in {}: {why}",
            args.pin_dir.display()
        )
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", inspect::render(&report));
    }
    Ok(())
}

pub fn cleanup(pin_dir: &Path, state_dir: &Path) -> anyhow::Result<()> {
    // Uninstalling removes the pins under a running agent on purpose (docs/kubernetes.md): its
    // programs stay attached until it exits. Its lock file stays with it.
    let running = lock::holder(state_dir, pin_dir).context("checking for a running agent")?;
    if let Some(holder) = &running {
        println!("{holder}: its programs stay attached until it exits, then go");
    }
    let removed = pins::remove_all(pin_dir)
        .with_context(|| format!("removing pins in {}", pin_dir.display()))?;
    if removed.is_empty()
        && let Some(why) = why_nothing_is_seen(pin_dir)
    {
        // The state file belongs to pins this mount namespace cannot see: it stays with them.
        println!("nothing pinned in {}: {why}", pin_dir.display());
        return Ok(());
    }
    let _ = std::fs::remove_dir(pin_dir);
    let _ = std::fs::remove_file(extproxy::dns::report::path(state_dir));
    let _ = std::fs::remove_file(extproxy::egress::state_path(state_dir));
    state::remove_all(state_dir, running.is_none());
    if removed.is_empty() {
        println!("nothing pinned in {}", pin_dir.display());
    } else {
        println!(
            "removed {} pin(s) from {}; programs detached",
            removed.len(),
            pin_dir.display()
        );
    }
    Ok(())
}

/// Why a pin folder may look empty here although an agent pinned into it: this command runs in a
/// mount namespace without that agent's bpffs (`ip netns exec`).
fn why_nothing_is_seen(pin_dir: &Path) -> Option<String> {
    Lifetime::of(pin_dir, false).why_nothing_is_seen(pin_dir)
}

pub fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    let set = ManifestSet::read_dir(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?;
    let (inventory, mut diagnostics) = set.inventory();
    let settings = settings(
        &args.services,
        &["192.0.2.1".parse()?, "2001:db8::1".parse()?],
        crate::run::egress_config(&args.egress)?.rules(),
        true,
        ClaimPolicy::SelectorLess,
    );
    let node = NodeInfo {
        addresses: vec!["192.0.2.1".parse()?],
    };
    let t = translate::translate(&inventory, &node, &settings);
    diagnostics.extend(t.diagnostics.iter().cloned());
    // Listed in full: finding what a folder serves is what `validate` is for.
    print_summary(&t, usize::MAX);
    for d in &diagnostics {
        println!("{d}");
    }
    if diag::has_errors(&diagnostics) {
        std::process::exit(1);
    }
    Ok(())
}

/// `extproxy convert-externalname FILE`: the conversion on standard output, notes on standard
/// error.
pub fn convert_externalname(args: &ConvertArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let options = extproxy::dns::convert::ConvertOptions {
        egress_ips: args.egress_ips.clone(),
    };
    let converted = extproxy::dns::convert::convert(&text, &options)
        .with_context(|| format!("converting {}", args.file.display()))?;
    for note in &converted.notes {
        eprintln!("note: {note}");
    }
    print!("{}", converted.yaml);
    Ok(())
}
