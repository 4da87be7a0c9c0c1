//! The control socket (`--api-socket PATH`) and its client (`blkswarm ctl`).
//!
//! One request per connection: the client writes a line (`stats`), the server answers with
//! one JSON document and closes. Requests are served on their own thread, so a slow client
//! never holds up a vCPU or an I/O worker.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use devices::io::FaultSettings;
use devices::nvme::ana::AnaState;
use devices::nvme::pci::NvmePciFunction;
use devices::nvme::NvmeController;

use crate::path_events::{Origin, PathEvents};
use crate::stats::{self, MeasuredDisk};

/// A request line longer than this is refused.
const MAX_REQUEST_BYTES: u64 = 256;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server answers from.
pub struct ApiState {
    pub disks: Arc<Vec<MeasuredDisk>>,
    pub timing: bool,
    /// Where controller events are recorded, for the stall each causes.
    pub path_events: Arc<PathEvents>,
}

/// The answer to one request line.
fn answer(state: &ApiState, request: &str) -> String {
    let mut words = request.split_whitespace();
    match words.next() {
        Some("stats") => serde_json::to_string(&stats::collect(
            &state.disks,
            state.timing,
            &state.path_events,
        ))
        .unwrap_or_else(|e| error_json(&format!("encoding the report: {e}"))),
        Some("fault") => set_faults(state, words).unwrap_or_else(|e| error_json(&e)),
        Some(request @ ("fatal" | "reset" | "fail" | "restore" | "ana")) => {
            controller_request(state, request, words).unwrap_or_else(|e| error_json(&e))
        }
        _ => error_json(&format!(
            "unknown request {:?}; known: stats, fault pci=ADDRESS [KEY=VALUE...], \
             fatal|fail|restore|reset pci=ADDRESS, \
             ana pci=ADDRESS group=NSID state=STATE [via_change_ms=N]",
            request.trim()
        )),
    }
}

/// The NVMe controller at `pci`.
fn nvme_function<'a>(
    disks: &'a [MeasuredDisk],
    pci: &str,
) -> Result<&'a Arc<Mutex<NvmePciFunction>>, String> {
    disks
        .iter()
        .find(|disk| disk.address.to_string() == pci)
        .ok_or_else(|| format!("no disk at {pci}"))?
        .nvme
        .as_ref()
        .ok_or_else(|| format!("{pci} is not an NVMe controller"))
}

/// The path event a host change of a controller records.
enum HostEvent {
    /// The controller keeps serving (an ANA change, a restore).
    Change(String),
    /// The controller stops serving until the guest resets it: see
    /// [`PathEvents::record_down`].
    Down(&'static str),
}

/// Runs `change` on the controller at `pci` and records `event` for it.
fn change_controller<T>(
    disks: &[MeasuredDisk],
    events: &PathEvents,
    pci: &str,
    event: HostEvent,
    change: impl FnOnce(&mut NvmeController) -> Result<T, String>,
) -> Result<T, String> {
    let function = nvme_function(disks, pci)?;
    let mut function = function.lock().unwrap_or_else(PoisonError::into_inner);
    let result = change(function.controller_mut())?;
    match event {
        HostEvent::Change(what) => events.record(pci, Origin::Host, what),
        HostEvent::Down(what) => events.record_down(pci, what.to_string()),
    }
    Ok(result)
}

/// Requests on NVMe controllers, each recorded as a path event:
/// - `fatal pci=A`: CSTS.CFS; it fetches no more commands until the guest resets it.
/// - `fail pci=A`: as fatal, and it stays down (not ready after the guest's reset) until
///   `restore pci=A`.
/// - `reset pci=A`: an NVM Subsystem Reset of A's subsystem (every controller of it): queues
///   vanish, commands in flight never complete, CSTS.NSSRO tells the guest why once its
///   command timeout fires.
/// - `ana pci=A group=G state=S [via_change_ms=N]`: A's ANA state of group G (the namespace
///   id) becomes S (optimized, non-optimized, inaccessible, persistent-loss, change); with
///   via_change_ms it is in the change state for N ms first (at most ANATT). `state=change`
///   alone holds the group changing until the next request: past ANATT (Linux waits twice
///   ANATT) the guest resets the controller.
fn controller_request<'a>(
    state: &ApiState,
    request: &str,
    words: impl Iterator<Item = &'a str>,
) -> Result<String, String> {
    let mut pci = None;
    let mut group = None;
    let mut ana_state = None;
    let mut via_change_ms = None;
    for word in words {
        let bad = || format!("{request}: {word:?}: expected KEY=VALUE");
        let (key, value) = word.split_once('=').ok_or_else(bad)?;
        let number = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("{request}: {key}={value:?} is not a number"))
        };
        match key {
            "pci" => pci = Some(value),
            "group" if request == "ana" => group = Some(number()?),
            "state" if request == "ana" => {
                ana_state = Some(AnaState::from_name(value).ok_or_else(|| {
                    format!(
                        "{request}: state={value:?}; known: {}",
                        AnaState::ALL.map(AnaState::name).join(", ")
                    )
                })?)
            }
            "via_change_ms" if request == "ana" => via_change_ms = Some(number()?),
            _ => return Err(format!("{request}: unknown key {key:?}")),
        }
    }
    let pci = pci.ok_or_else(|| format!("{request}: give pci=ADDRESS"))?;
    let disks = &state.disks;
    let events = &state.path_events;
    let err = |e: String| format!("{request}: {e}");
    match request {
        "fatal" => change_controller(disks, events, pci, HostEvent::Down("fatal"), |c| {
            c.fatal_error();
            Ok(())
        })
        .map_err(err)?,
        "fail" => change_controller(disks, events, pci, HostEvent::Down("fail"), |c| {
            c.fail();
            Ok(())
        })
        .map_err(err)?,
        // Not an event unless the controller was failed.
        "restore" => change_controller(
            disks,
            events,
            pci,
            HostEvent::Change("restore".into()),
            |c| {
                c.restore()
                    .then_some(())
                    .ok_or_else(|| format!("{pci} was not failed"))
            },
        )
        .map_err(err)?,
        "reset" => {
            nvme_function(disks, pci).map_err(err)?;
            let mut members = events.subsystem_of(pci);
            if members.is_empty() {
                members.push(pci.to_string());
            }
            // One event for the subsystem: a second would close the first at once.
            for member in &members {
                let function = nvme_function(disks, member).map_err(err)?;
                let mut function = function.lock().unwrap_or_else(PoisonError::into_inner);
                function.controller_mut().subsystem_reset();
            }
            let event = match members.len() {
                1 => "reset".to_string(),
                n => format!("reset (subsystem, {n} controllers)"),
            };
            events.record(pci, Origin::Host, event);
        }
        _ => {
            let group = group.ok_or("ana: give group=NSID")?;
            let target = ana_state.ok_or("ana: give state=STATE")?;
            let set = |target: AnaState| {
                change_controller(
                    disks,
                    events,
                    pci,
                    HostEvent::Change(format!("ana group={group} state={}", target.name())),
                    |c| c.set_ana_state(group, target),
                )
                .map_err(err)
            };
            match via_change_ms {
                None => {
                    set(target)?;
                }
                Some(ms) => {
                    let anatt = nvme_function(disks, pci)
                        .map_err(err)?
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .controller()
                        .config()
                        .ana_transition_time_secs;
                    let limit_ms = u32::from(anatt) * 1000;
                    if ms > limit_ms {
                        return Err(format!(
                            "ana: via_change_ms={ms} is beyond ANATT ({limit_ms} ms): the guest \
                             would reset the controller"
                        ));
                    }
                    set(AnaState::Change)?;
                    let (disks, events, pci) = (disks.clone(), events.clone(), pci.to_string());
                    std::thread::Builder::new()
                        .name("ana-transition".into())
                        .spawn(move || {
                            std::thread::sleep(Duration::from_millis(u64::from(ms)));
                            let event = format!("ana group={group} state={}", target.name());
                            let event = HostEvent::Change(event);
                            if let Err(e) = change_controller(&disks, &events, &pci, event, |c| {
                                c.set_ana_state(group, target)
                            }) {
                                eprintln!("blkswarm: ana transition of {pci}: {e}");
                            }
                        })
                        .map_err(|e| format!("ana: {e}"))?;
                }
            }
        }
    }
    let function = nvme_function(disks, pci).map_err(err)?;
    let function = function.lock().unwrap_or_else(PoisonError::into_inner);
    let controller = function.controller();
    let counters = controller.counters();
    Ok(serde_json::json!({
        "pci": pci,
        "ready": controller.is_ready(),
        "held_down": controller.is_held_down(),
        "fatal_errors": counters.fatal_errors,
        "resets": counters.resets,
        "subsystem_resets": counters.subsystem_resets,
        "ana_changes": counters.ana_changes,
        "ana_states": stats::ana_state_names(controller),
    })
    .to_string())
}

/// `fault pci=0000:00:01.0 error_rate=0.1 read_latency=fixed:5ms ...`: changes the disk's
/// fault settings (keys as the `fault_*` disk options, with or without the prefix; `clear`
/// drops every setting first) and answers with the settings and counts now in force.
fn set_faults<'a>(
    state: &ApiState,
    words: impl Iterator<Item = &'a str>,
) -> Result<String, String> {
    let mut pci = None;
    let mut changes = Vec::new();
    let mut clear = false;
    for word in words {
        match word.split_once('=') {
            Some(("pci", address)) => pci = Some(address),
            Some((key, value)) => changes.push((key.trim_start_matches("fault_"), value)),
            None if word == "clear" => clear = true,
            None => return Err(format!("{word:?}: expected KEY=VALUE or clear")),
        }
    }
    let pci = pci.ok_or("fault: give pci=ADDRESS")?;
    let disk = state
        .disks
        .iter()
        .find(|disk| disk.address.to_string() == pci)
        .ok_or_else(|| format!("fault: no disk at {pci}"))?;
    let mut settings = if clear {
        FaultSettings::default()
    } else {
        disk.faults.settings()
    };
    for (key, value) in changes {
        settings
            .set(key, value)
            .map_err(|e| format!("fault: {e}"))?;
    }
    disk.faults.set(settings.clone());
    let counts = disk.faults.counts();
    Ok(serde_json::json!({
        "pci": pci,
        "settings": format!("{settings:?}"),
        "errors": counts.errors,
        "stuck": counts.stuck,
        "delayed": counts.delayed,
    })
    .to_string())
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn serve_one(state: &ApiState, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST_BYTES)).read_line(&mut line)?;
    let mut stream = stream;
    stream.write_all(answer(state, &line).as_bytes())?;
    stream.write_all(b"\n")
}

/// Removes the socket file when the VMM ends.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (replacing a stale socket file) and serves it on a thread.
pub fn spawn(path: &Path, state: ApiState) -> io::Result<ApiServer> {
    if path.exists() {
        // A socket left by an earlier run; refuse to clobber anything else.
        let metadata = std::fs::symlink_metadata(path)?;
        use std::os::unix::fs::FileTypeExt;
        if !metadata.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("api-socket".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = serve_one(&state, stream) {
                            eprintln!("blkswarm: api socket: {e}");
                        }
                    }
                    Err(e) => eprintln!("blkswarm: api socket accept: {e}"),
                }
            }
        })?;
    Ok(ApiServer {
        path: path.to_path_buf(),
    })
}

/// `blkswarm ctl`: sends `request` to the server at `socket`, returns its answer.
pub fn request(socket: &Path, request: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{DiskKind, MeasuredQueue, Report};
    use devices::io::Faults;
    use devices::latency::QueueLatency;
    use devices::pci::PciAddress;

    #[test]
    fn stats_over_the_socket_is_the_report() {
        let latency = Arc::new(QueueLatency::new());
        let disks = Arc::new(vec![MeasuredDisk {
            address: PciAddress {
                bus: 0,
                device: 1,
                function: 0,
            },
            kind: DiskKind::VirtioBlk,
            queues: vec![MeasuredQueue {
                name: "q0".into(),
                latency,
            }],
            msix: None,
            faults: Arc::new(Faults::default()),
            nvme: None,
            subsystem_nqn: None,
        }]);
        let path = std::env::temp_dir().join(format!("blkswarm-api-{}.sock", std::process::id()));
        let state_disks = disks.clone();
        let server = spawn(
            &path,
            ApiState {
                disks,
                timing: true,
                path_events: Arc::new(PathEvents::new(&[])),
            },
        )
        .unwrap();
        let answer = request(&path, "stats").unwrap();
        let report: Report = serde_json::from_str(&answer).unwrap();
        assert_eq!(report.schema, stats::SCHEMA);
        assert_eq!(report.disks.len(), 1);
        assert_eq!(report.disks[0].pci, "0000:00:01.0");
        assert_eq!(report.disks[0].idle_queues, 1, "q0 served nothing yet");
        let answer = request(&path, "frobnicate").unwrap();
        assert!(answer.contains("unknown request"), "{answer}");
        // Faults at run time: set, refused, cleared.
        let answer = request(
            &path,
            "fault pci=0000:00:01.0 fault_error_rate=0.5 stuck_rate=0.1",
        )
        .unwrap();
        assert!(answer.contains("error_rate: 0.5"), "{answer}");
        let faults = &state_disks[0].faults;
        assert_eq!(faults.settings().stuck_rate, 0.1);
        let answer = request(&path, "fault pci=0000:00:01.0 error_rate=2").unwrap();
        assert!(answer.contains("\"error\""), "{answer}");
        assert_eq!(
            faults.settings().error_rate,
            0.5,
            "a refused change changes nothing"
        );
        assert!(request(&path, "fault pci=0000:09:00.0 clear")
            .unwrap()
            .contains("no disk"));
        request(&path, "fault pci=0000:00:01.0 clear").unwrap();
        assert_eq!(faults.settings(), FaultSettings::default());
        drop(server);
        assert!(!path.exists(), "the socket file goes with the server");
    }
}
