//! The clinician view in a real browser: runs `browser-tests/view.test.mjs` (Debian's
//! chromium driven by playwright-core, axe-core for accessibility) against the demo region
//! started from this build's binary. Screenshots land in `browser-tests/artefacts/`.
//!
//! It sets up what it needs when it can, so that `cargo test --workspace` on a fresh machine
//! needs nothing run first: the pinned npm packages (`npm ci`, from `package-lock.json`)
//! when Node.js and npm are present, and Debian's chromium (`apt-get install chromium`) when
//! running as root. When it cannot, it fails and says exactly what to install: a browser test
//! that quietly passes when no browser ran would prove nothing.

mod support;

use std::path::Path;
use std::process::Command;
use support::{ensure_npm_packages, found, repo_root, set_up};

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Installs the pinned npm packages and chromium if they are missing and it can; returns
/// what is still missing, each with the command that installs it.
fn install_what_is_missing(tests: &Path, chromium: &str) -> Vec<String> {
    let mut missing = Vec::new();
    if let Err(error) = ensure_npm_packages(tests, &["playwright-core", "axe-core"]) {
        missing.push(error);
    }
    if !Path::new(chromium).exists() {
        let installed = if is_root() && found("apt-get") {
            let root = Path::new("/");
            set_up(
                "updating Debian's package lists",
                "apt-get",
                &["update"],
                root,
            )
            .and_then(|()| {
                let args = ["install", "-y", "--no-install-recommends", "chromium"];
                set_up("installing Debian's chromium", "apt-get", &args, root)
            })
            .err()
        } else {
            Some("not running as root, so it was not installed here".into())
        };
        if !Path::new(chromium).exists() {
            missing.push(format!(
                "{chromium} (run `sudo apt-get install -y chromium`, or set CHROMIUM){}",
                installed.map(|why| format!(": {why}")).unwrap_or_default()
            ));
        }
    }
    missing
}

#[test]
fn the_clinician_view_works_in_chromium() {
    let root = repo_root();
    let tests = root.join("browser-tests");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing = install_what_is_missing(&tests, &chromium);
    assert!(
        missing.is_empty(),
        "the browser tests need: {}",
        missing.join("; ")
    );
    let output = Command::new("node")
        .args(["--test", "--test-reporter=spec", "view.test.mjs"])
        .current_dir(&tests)
        .env("CAREMESH_BIN", env!("CARGO_BIN_EXE_caremesh"))
        .env("CHROMIUM", &chromium)
        .output()
        .expect("node runs (install Node.js 20 or newer)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "browser tests failed:\n{report}");
    assert!(
        report.contains("pass 5") && report.contains("fail 0"),
        "expected five browser tests to pass:\n{report}"
    );
}
