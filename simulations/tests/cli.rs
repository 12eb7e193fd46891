//! The `caremesh-sim` binary as a resilience tester runs it: a scenario file in, a report
//! out, a clear error for a bad scenario, and a failing seed printed with its replay command.

use std::path::Path;
use std::process::{Command, Output};

fn simulate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caremesh-sim"))
        .args(args)
        .env("CAREMESH_LOG", "error")
        .output()
        .expect("caremesh-sim runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The shipped hub-outage scenario, with the hub's disk failing two commits in five for
/// the first ten minutes, and a bug planted in its driver if `planted` names one.
fn scenario_with_failing_disk(dir: &Path, planted: Option<&str>) -> std::path::PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/hub-outage.toml");
    let mut text = std::fs::read_to_string(shipped).unwrap();
    text.push_str(
        "\n[[faults]]\nat_s = 60\nkind = \"disk\"\nnodes = [\"HUB01\"]\nuntil_s = 660\ncommit_failure = 0.4\n",
    );
    if let Some(bug) = planted {
        text.push_str(&format!(
            "\n[[inject]]\nnode = \"HUB01\"\nbug = \"{bug}\"\n"
        ));
    }
    let path = dir.join(format!("{}.toml", planted.unwrap_or("healthy")));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_scenario_is_named_with_its_place() {
    let temp = tempfile::tempdir().unwrap();
    let scenario = temp.path().join("bad.toml");
    std::fs::write(
        &scenario,
        "name = \"bad\"\nduration_s = 60\n[[nodes]]\nods = \"GP1\"\nkind = \"gp\"\npeers = [\"NOPE\"]\n",
    )
    .unwrap();
    let output = simulate(&[scenario.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("`GP1` dials `NOPE`, which is not a node"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn a_failing_disk_passes_and_a_planted_ack_ordering_bug_fails_with_its_replay_command() {
    let temp = tempfile::tempdir().unwrap();
    let healthy = scenario_with_failing_disk(temp.path(), None);
    let output = simulate(&[healthy.to_str().unwrap(), "--seed", "3"]);
    let report = text(&output.stdout);
    assert!(output.status.success(), "{report}{}", text(&output.stderr));
    assert!(report.contains("disk faults:"), "{report}");

    let planted = scenario_with_failing_disk(temp.path(), Some("ack-after-failed-commit"));
    let output = simulate(&[planted.to_str().unwrap(), "--seed", "3"]);
    let report = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAILED") && report.contains("acknowledged"),
        "{report}"
    );
    assert!(
        text(&output.stderr).contains(&format!(
            "replay: caremesh sim {} --seed 3",
            planted.display()
        )),
        "{}",
        text(&output.stderr)
    );
}
