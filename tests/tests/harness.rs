//! Self-tests of the harness machinery with stand-in commands instead of blkswarm:
//! direct mode always (plain host processes, no KVM needed), and the lab when this
//! host uses the lab (there it must work: a failure to boot L1 fails the test).

use std::time::{Duration, Instant};

use harness::{GuestSpec, Mode, Runner};

fn sh(name: &str, script: &str) -> GuestSpec {
    GuestSpec::new(name, "unused").custom_command(["sh", "-c", script])
}

#[test]
fn direct_mode_outcomes() {
    let runner =
        Runner::with_mode(Mode::Direct, "harness self-test").unwrap_or_else(|e| panic!("{e}"));
    let specs = [
        sh(
            "ok",
            "printf '@@guest nproc=2\\r\\n'; echo '[ 0.1] noise'; \
             echo '@@vmm exit reason=poweroff' >&2; echo '@@guest done'",
        ),
        sh("fails", "echo '@@guest done'; exit 3"),
        sh("no_done", "echo '@@guest nproc=1'"),
        sh("hangs", "echo '@@guest started=1'; exec sleep 30").timeout(Duration::from_secs(1)),
    ];
    let t0 = Instant::now();
    let (o, lab) = runner.run(&specs).unwrap_or_else(|e| panic!("{e}"));
    assert!(lab.is_none());
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "timeout not enforced"
    );

    assert_eq!(o[0].expect_clean(), Ok(()));
    assert_eq!(o[0].get("nproc"), Some("2"));
    assert_eq!(o[0].vmm_get("reason"), Some("poweroff"));
    assert!(o[0].console.contains("[ 0.1] noise"));
    assert!(o[0].wall_ms.is_some());

    assert_eq!(o[1].exit_code, Some(3));
    assert!(o[1].done);
    assert!(o[1].expect_clean().unwrap_err().contains("exit code 3"));

    assert_eq!(o[2].exit_code, Some(0));
    assert!(o[2]
        .expect_clean()
        .unwrap_err()
        .contains("no `@@guest done`"));

    let lost = o[3]
        .lost
        .as_deref()
        .expect("hanging guest must be reported lost");
    assert!(lost.contains("timed out after 1 s"), "{lost}");
    assert!(
        lost.contains("@@guest started=1"),
        "console tail missing: {lost}"
    );
    assert!(o[3].expect_clean().unwrap_err().contains("LOST"));
}

#[test]
fn invalid_specs_are_rejected() {
    let runner = Runner::with_mode(Mode::Direct, "harness self-test").unwrap();
    assert!(runner.run(&[sh("a", "true"), sh("a", "true")]).is_err());
    assert!(runner.run(&[GuestSpec::new("bad name", "boot")]).is_err());
}

/// One L1 boot: a clean stand-in guest, one killed by the in-L1 timeout, one that
/// powers L1 off mid-run (lost), and one that therefore never starts.
#[test]
fn lab_mode_outcomes() {
    // L1 is killed on purpose: no rerun, and nothing in the suite's lab log.
    let runner = Runner::detect()
        .unwrap_or_else(|e| panic!("{e}"))
        .lab_attempts(1)
        .lab_log(false);
    if runner.mode() != Mode::Lab {
        eprintln!(
            "lab self-test not run: this host runs guests directly ({})",
            runner.why()
        );
        return;
    }
    let specs = [
        sh(
            "echo",
            "echo '@@guest x=1'; echo '@@vmm exit reason=poweroff' >&2; echo '@@guest done'",
        ),
        sh("sleeper", "echo '@@guest sleeping=1'; exec sleep 600").timeout(Duration::from_secs(3)),
        sh("crash", "echo '@@guest partial=1'; poweroff -f; sleep 60"),
        sh("after", "echo '@@guest done'"),
    ];
    let (o, lab) = runner.run(&specs).unwrap_or_else(|e| panic!("{e}"));
    let lab = lab.expect("lab report");
    assert!(lab.l1_ready_ms.is_some());
    assert!(lab.console.contains("@@lab ready"));

    assert_eq!(o[0].expect_clean(), Ok(()), "{}", lab.console);
    assert_eq!(o[0].get("x"), Some("1"));
    assert_eq!(o[0].vmm_get("reason"), Some("poweroff"));

    assert_eq!(
        o[1].exit_code,
        Some(143),
        "in-L1 timeout (SIGTERM): {:?}",
        o[1]
    );
    assert!(o[1].expect_clean().unwrap_err().contains("timeout"));

    let lost = o[2].lost.as_deref().expect("crash must be lost");
    assert!(lost.starts_with("began but never ended"), "{lost}");
    assert!(lost.contains("@@guest partial=1"), "{lost}");
    assert_eq!(o[2].get("partial"), Some("1"));

    let never = o[3].lost.as_deref().expect("after must be lost");
    assert!(never.starts_with("never started"), "{never}");
    assert!(!o[3].done);
}
