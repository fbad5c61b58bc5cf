//! The commands that do one thing and exit: `inspect`, `cleanup` and `validate`.

use std::path::Path;

use anyhow::Context as _;
use extproxy::{
    diag, inspect,
    manifest::ManifestSet,
    pins,
    translate::{self, ClaimPolicy, NodeInfo},
};

use crate::{
    cli::{InspectArgs, ValidateArgs},
    run::manifest_mode::{print_summary, settings},
};

pub fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let report = inspect::collect(&args.pin_dir, &args.state_dir).with_context(|| {
        format!(
            "reading the maps pinned in {} (is extproxy running?)",
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
    let removed = pins::remove_all(pin_dir)
        .with_context(|| format!("removing pins in {}", pin_dir.display()))?;
    let _ = std::fs::remove_dir(pin_dir);
    let _ = std::fs::remove_file(extproxy::state::path(state_dir));
    let _ = std::fs::remove_file(extproxy::egress::state_path(state_dir));
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

pub fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    let set = ManifestSet::read_dir(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?;
    let (inventory, mut diagnostics) = set.inventory();
    let settings = settings(
        &args.services,
        &["192.0.2.1".parse()?, "2001:db8::1".parse()?],
        true,
        ClaimPolicy::SelectorLess,
    );
    let node = NodeInfo {
        addresses: vec!["192.0.2.1".parse()?],
    };
    let t = translate::translate(&inventory, &node, &settings);
    diagnostics.extend(t.diagnostics.iter().cloned());
    print_summary(&t);
    for d in &diagnostics {
        println!("{d}");
    }
    if diag::has_errors(&diagnostics) {
        std::process::exit(1);
    }
    Ok(())
}
