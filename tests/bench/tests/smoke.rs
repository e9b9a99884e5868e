//! The bench still drives a real stack end to end: a tiny run of every scenario against the
//! debug binaries (built by `make test` before the tests), checking that it finished without
//! errors and wrote a complete report. No timing is asserted: the bench is not a test of speed.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_tiny_run_of_every_scenario_ends_without_errors_and_writes_its_report() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_callapi-bench"));
    let bin_dir = bench.parent().expect("target dir").to_path_buf();
    for service in [
        "gateway",
        "commands",
        "proxy-connector",
        "event-ingest",
        "opensips-emulator",
    ] {
        assert!(
            bin_dir.join(service).exists(),
            "{service} is missing in {}: run `cargo build --workspace --bins` first (make test does)",
            bin_dir.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("callapi-bench-smoke-{}", std::process::id()));
    let output = dir.join("bench.json");
    let run = Command::new(&bench)
        .args([
            "--duration-secs",
            "0.3",
            "--clients",
            "1,3",
            "--overhead-clients",
            "2",
        ])
        .args([
            "--idle-connections",
            "20",
            "--idle-rounds",
            "1",
            "--event-clients",
            "2",
            "--fanout-runs",
            "3:500",
            "--fanout-dialogs",
            "200",
        ])
        .args(["--settle-ms", "100", "--timeout-ms", "10000"])
        .arg("--work-dir")
        .arg(dir.join("stack"))
        .arg("--output")
        .arg(&output)
        .output()
        .expect("run callapi-bench");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "callapi-bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&output).expect("report written"))
            .expect("report is JSON");
    let fanout = &report["fanout"][0];
    assert_eq!(fanout["subscribers"], 3, "{fanout}");
    assert_eq!(fanout["delivered"], 3 * 400, "{fanout}");
    assert_eq!(fanout["lost"], 0, "{fanout}");
    let cycles = report["cycles"].as_array().expect("cycles");
    assert_eq!(cycles.len(), 2);
    for row in cycles {
        assert_eq!(row["errors"]["count"], 0, "{row}");
        assert!(row["cycles"].as_u64().is_some_and(|n| n > 0), "{row}");
        assert!(row["nats_msgs_per_cycle"].as_f64().is_some(), "{row}");
    }
    let overhead = &report["overhead"][0];
    assert_eq!(overhead["clients"], 2);
    assert_eq!(overhead["rows"].as_array().map(Vec::len), Some(3));
    for row in overhead["rows"].as_array().expect("rows") {
        assert!(
            row["callapi"]["count"].as_u64().is_some_and(|n| n > 0),
            "{row}"
        );
        assert!(
            row["direct"]["count"].as_u64().is_some_and(|n| n > 0),
            "{row}"
        );
    }
    let idle = &report["idle"][0];
    assert_eq!(idle["opened"], 20);
    assert_eq!(idle["still_open"], 20);
    assert!(idle["rss_open_kib"].as_u64().is_some());
    let events = &report["events"][0];
    assert_eq!(events["errors"]["count"], 0, "{events}");
    assert_eq!(events["client_events"], events["commands"], "{events}");
    assert!(
        events["node_events"].as_u64().is_some_and(|n| n > 0),
        "{events}"
    );
    assert_eq!(report["dead_processes"].as_array().map(Vec::len), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
