//! The clinician view in a real browser: runs `browser-tests/view.test.mjs` (Debian's
//! chromium driven by playwright-core, axe-core for accessibility) against the demo region
//! started from this build's binary. Screenshots land in `browser-tests/artefacts/`.
//!
//! Needs Node.js, `npm ci --prefix browser-tests` and chromium (`apt install chromium`);
//! `.ci/run` installs them. Without them this test fails and says what to install: a browser
//! test that quietly passes when no browser ran would prove nothing.

mod support;

use std::process::Command;
use support::repo_root;

#[test]
fn the_clinician_view_works_in_chromium() {
    let root = repo_root();
    let tests = root.join("browser-tests");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<String> = [
        (
            tests.join("node_modules/playwright-core").exists(),
            "browser-tests/node_modules (run `npm ci --prefix browser-tests`)".to_string(),
        ),
        (
            std::path::Path::new(&chromium).exists(),
            format!("{chromium} (run `apt install chromium`, or set CHROMIUM)"),
        ),
    ]
    .into_iter()
    .filter(|(present, _)| !present)
    .map(|(_, what)| what)
    .collect();
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
