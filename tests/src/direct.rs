//! Direct mode: blkswarm as a host process on hardware KVM, one guest at a time.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::parse::Collected;
use crate::{io_err, GuestOutcome, GuestSpec, HarnessError, Mode, Paths};

/// Reads `r` line by line into `tx`, then sends None.
pub(crate) fn spawn_line_reader(
    r: impl Read + Send + 'static,
    tx: mpsc::Sender<Option<String>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                    }
                    if tx
                        .send(Some(String::from_utf8_lossy(&buf).into_owned()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(None);
    })
}

/// Makes the child get SIGKILL when the thread that spawned it dies (an interrupted
/// test run must not leave QEMU or blkswarm running). Runner::run spawns and waits on
/// the same thread, so the child never outlives a normal run either way.
pub(crate) fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

pub(crate) fn run_one(
    spec: &GuestSpec,
    paths: &Paths,
    bin: Option<&Path>,
    verbose: bool,
) -> Result<GuestOutcome, HarnessError> {
    let report_dir = std::env::temp_dir()
        .join(format!("blkswarm-reports-{}", std::process::id()))
        .join(&spec.name);
    let argv = match bin {
        Some(bin) => {
            let (kernel, initramfs) = spec.image_paths(crate::Mode::Direct, paths);
            let mut argv = spec.argv(&bin.to_string_lossy(), &kernel, &initramfs);
            if spec.uses_vmm() {
                argv.extend(["--report".to_string(), report_dir.display().to_string()]);
            }
            argv
        }
        None => spec.argv("", "", ""),
    };
    let tag = format!("[{}] ", spec.name);
    if verbose {
        eprintln!("{tag}$ {}", crate::shell::join(&argv));
    }
    let start = Instant::now();
    let mut child = die_with_parent(Command::new(&argv[0]).args(&argv[1..]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("cannot start {}", argv[0])))?;
    let (tx, rx) = mpsc::channel();
    let readers = [
        spawn_line_reader(child.stdout.take().expect("piped stdout"), tx.clone()),
        spawn_line_reader(child.stderr.take().expect("piped stderr"), tx),
    ];

    let mut out = GuestOutcome::new(&spec.name, Mode::Direct);
    let mut collected = Collected::default();
    let mut eofs = 0;
    let mut deadline = start + spec.timeout;
    let mut terminated = false;
    let mut killed = false;
    while eofs < readers.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Some(line)) => {
                // A step that runs blkswarm itself hands its report over as the lab does.
                let clean = crate::parse::clean_line(&line);
                if let Some((_, json)) = clean
                    .split_once(" json=")
                    .filter(|(head, _)| head.starts_with("@@lab report "))
                {
                    out.report = Some(json.to_string());
                    continue;
                }
                // A fetched file's base64 lines are data, not news.
                let clean = crate::parse::clean_line(&line);
                if verbose && !clean.starts_with("@@fetch data=") {
                    eprintln!("{tag}{clean}");
                }
                collected.feed(&line);
                out.console.push_str(&crate::parse::clean_line(&line));
                out.console.push('\n');
            }
            Ok(None) => eofs += 1,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if !terminated => {
                // SIGTERM first: blkswarm then prints where each vCPU and queue was.
                terminated = true;
                // SAFETY: kill only sends a signal to our child, which is not reaped yet.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                out.lost = Some(format!(
                    "timed out after {} s and was stopped (SIGTERM)",
                    spec.timeout.as_secs()
                ));
                deadline = Instant::now() + Duration::from_secs(crate::lab::TERM_GRACE_SECS);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !killed => {
                killed = true;
                let _ = child.kill();
                out.lost = Some(format!(
                    "timed out after {} s and was killed (no exit {} s after SIGTERM)",
                    spec.timeout.as_secs(),
                    crate::lab::TERM_GRACE_SECS
                ));
                // The pipes close when the process is gone; give the readers a moment.
                deadline = Instant::now() + Duration::from_secs(5);
            }
            // Something else (a grandchild?) keeps the pipes open: stop reading.
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    let status = child
        .wait()
        .map_err(io_err(format!("waiting for {}", argv[0])))?;
    let wall_ms = start.elapsed().as_millis() as u64;
    if eofs == readers.len() {
        for r in readers {
            let _ = r.join();
        }
    }
    out.exit_code = status.code();
    out.wall_ms = Some(wall_ms);
    if let Some(sig) = status.signal() {
        out.console
            .push_str(&format!("[harness] process killed by signal {sig}\n"));
    }
    out.results = collected.results;
    out.vmm = collected.vmm;
    out.done = collected.done;
    if bin.is_some() && spec.uses_vmm() {
        out.report = std::fs::read_to_string(report_dir.join("report.json")).ok();
        let _ = std::fs::remove_dir_all(&report_dir);
    }
    if let Some(reason) = out.lost.take() {
        let lost = format!("{reason}\n{}", out.describe_tail());
        eprintln!(
            "!!!!!!!! harness: guest '{}' LOST: {lost}\n!!!!!!!!",
            spec.name
        );
        out.lost = Some(lost);
    }
    if verbose {
        eprintln!(
            "{tag}exit code {:?}, wall {wall_ms} ms, done={}",
            out.exit_code, out.done
        );
    }
    Ok(out)
}
