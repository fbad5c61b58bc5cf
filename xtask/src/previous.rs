//! The previous release of the agent, for the upgrade tests: built once from this repository's
//! history (the last main before the flow tables' layout changed) into the cache, so that a test
//! can run it, leave live flows in its pinned maps, and upgrade to the agent under test.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

/// What the upgrade tests read: the previous agent's binary.
pub const BIN_ENV: &str = "EXTPROXY_PREVIOUS_AGENT";

/// main's last commit with ABI 2 (the layouts issue 10 asked to migrate from).
const ABI2_COMMIT: &str = "3ce4d899af05cef7909591845977d2226f16a08b";

/// The previous agent's binary: from the cache, else built from the repository's history (about
/// a minute beside a built workspace, sharing its target directory). None, with the reason
/// printed, when the history does not hold the commit (a shallow clone).
pub fn agent(workspace: &Path, target_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let short = &ABI2_COMMIT[..12];
    let dir = crate::k8s::cache_root().join(format!("agent-abi2-{short}"));
    let bin = dir.join("extproxy");
    if bin.exists() {
        return Ok(Some(bin));
    }
    let has_commit = Command::new("git")
        .args(["cat-file", "-e", &format!("{ABI2_COMMIT}^{{commit}}")])
        .current_dir(workspace)
        .status()
        .is_ok_and(|s| s.success());
    if !has_commit {
        println!(
            "the upgrade tests are skipped: this checkout's history lacks {short} (the previous \
             release they upgrade from); a full clone has it"
        );
        return Ok(None);
    }
    println!("building the previous agent ({short}, ABI 2) for the upgrade tests");
    let src = target_dir.join(format!("previous-src-{short}"));
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace)
            .status()
            .with_context(|| format!("git {}", args.join(" ")))
    };
    let _ = std::fs::remove_dir_all(&src);
    let _ = git(&["worktree", "prune"]);
    let src_arg = src.to_string_lossy().into_owned();
    ensure!(
        git(&[
            "worktree",
            "add",
            "--detach",
            "--force",
            &src_arg,
            ABI2_COMMIT
        ])?
        .success(),
        "git worktree add {short} failed"
    );
    // The same target directory: the dependencies are built once for both.
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "-p", "proxy-user", "--bin", "extproxy"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(&src)
        .status()
        .context("cargo build of the previous agent")?;
    let built = target_dir.join("debug/extproxy");
    let copied = status.success() && {
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("extproxy.tmp");
        std::fs::copy(&built, &tmp).context("copying the previous agent")?;
        std::fs::rename(&tmp, &bin)?;
        true
    };
    let _ = git(&["worktree", "remove", "--force", &src_arg]);
    ensure!(copied, "building the previous agent ({short}) failed");
    Ok(Some(bin))
}
