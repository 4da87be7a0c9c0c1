//! Your kernel, your workload (docs/own-kernel.md): a kernel tree built from Debian's
//! linux-source package with a minimal config (guests/kernel-from-source.sh) boots with 500
//! disks through `blkswarm-guest --kernel TREE`, runs a user's fio job file copied in with
//! `--guest-file`, and returns its output, its exit status and a fetched file; a failing
//! command's status comes back as the runner's; bad input is refused before anything boots.
//!
//! Each test runs the runner binary as a user would. Lab or direct KVM, whichever the host
//! has; with neither, the runner fails and so does the test, saying why.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use harness::user_kernel::UserKernel;
use harness::words;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The kernel tree, built once (cached in .cache/src/ by the script).
fn tree() -> &'static Path {
    static TREE: OnceLock<PathBuf> = OnceLock::new();
    TREE.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("guests/kernel-from-source.sh"))
            .output()
            .expect("bash guests/kernel-from-source.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "guests/kernel-from-source.sh failed ({}):\n{}\n{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("the script prints the tree")
                .trim(),
        )
    })
}

fn runner(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_blkswarm-guest"))
        .args(args)
        .env("BLKSWARM_VERBOSE", "0")
        .output()
        .expect("run blkswarm-guest");
    eprintln!(
        "$ blkswarm-guest {}\n--- stdout ---\n{}--- stderr (tail) ---\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        harness::tail(&String::from_utf8_lossy(&out.stderr), 40)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the runner's `@@guest KEY=VALUE` line.
fn guest<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("@@guest "))
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

#[test]
fn own_kernel_tree_boots_500_disks_and_runs_a_users_fio_job() {
    let tree = tree();
    let release = UserKernel::open(tree)
        .unwrap_or_else(|e| panic!("{e}"))
        .release;
    let fetch_dir =
        std::env::temp_dir().join(format!("blkswarm-own-kernel-{}", std::process::id()));
    let job = repo().join("tests/data/own-kernel.fio");
    let tree_arg = tree.display().to_string();
    let job_arg = format!("{}:/root/job.fio", job.display());
    let fetch_dir_arg = fetch_dir.display().to_string();
    let out = runner(&[
        "--kernel",
        &tree_arg,
        "--name",
        "own-kernel-500",
        "--cpus",
        "2",
        "--timeout",
        "500",
        "--cmdline",
        "blkswarm.timeout=300",
        "--setup",
        "truncate -s 64M {scratch}/data.img",
        "--arg=--disk",
        "--arg=path={scratch}/data.img,num_queues=2",
        "--arg=--disks",
        "--arg=count=499,backend=null,size=1G,num_queues=2",
        "--guest-file",
        &job_arg,
        "--run",
        "fio --output-format=json --output=/root/fio.json job.fio; rc=$?; \
         echo \"fio exit $rc\"; grep '\"jobname\"' fio.json; exit $rc",
        "--fetch",
        "/root/fio.json",
        "--fetch-dir",
        &fetch_dir_arg,
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "the runner's status is fio's");
    // The tree's kernel ran (its NVMe module: a_failing_command_...).
    assert_eq!(guest(&text, "kernel"), Some(release.as_str()), "{text}");
    assert!(guest(&text, "error").is_none(), "a guest error: {text}");
    // 500 disks: with 2 vCPUs part of them cannot get vectors (S1); every one that did is a
    // disk in the guest, the file-backed one first.
    let disks = text
        .lines()
        .find_map(|l| l.strip_prefix("@@vmm disks total="))
        .map(|rest| format!("total={rest}"))
        .expect("the host's disk summary");
    let disks = words(&disks);
    assert_eq!(disks["total"], "500", "{disks:?}");
    let bound: usize = disks["per_queue_msix"].parse::<usize>().unwrap()
        + disks["shared_msix"].parse::<usize>().unwrap()
        + disks["intx"].parse::<usize>().unwrap();
    assert!(bound > 0, "{disks:?}");
    assert_eq!(guest(&text, "disks"), Some(bound.to_string().as_str()));
    // The command's output came back, prefixed, and its status.
    assert!(text.contains("run| fio exit 0"), "{text}");
    assert!(text.contains("run| ") && text.contains("\"jobname\" : \"verify-vda\""));
    assert!(text.contains("command:     exit status 0"), "{text}");
    // The fetched file is fio's JSON: both jobs ran without error, the verify job wrote
    // and read back 16 MiB.
    let json = std::fs::read_to_string(fetch_dir.join("root/fio.json"))
        .unwrap_or_else(|e| panic!("fetched fio.json: {e}\n{text}"));
    let v: serde_json::Value = serde_json::from_str(&json).expect("fio's JSON");
    let jobs = v["jobs"].as_array().expect("jobs");
    let job = |name: &str| {
        jobs.iter()
            .find(|j| j["jobname"] == name)
            .unwrap_or_else(|| panic!("no job {name} in {json}"))
    };
    assert_eq!(job("verify-vda")["error"], 0);
    assert_eq!(job("verify-vda")["write"]["io_kbytes"], 16384);
    assert_eq!(job("verify-vda")["read"]["io_kbytes"], 16384);
    assert_eq!(job("read-vdb")["error"], 0);
    assert!(job("read-vdb")["read"]["total_ios"].as_u64().unwrap() > 0);
    let _ = std::fs::remove_dir_all(&fetch_dir);
}

/// A kernel matrix of two (Debian's 6.12 from the cache, and the tree's 6.1) in one lab
/// run, each running a command that fails: each guest's status and output come back, the
/// runner exits with the status, and the matrix has one row per kernel. Also the tree
/// kernel's NVMe driver, a module (CONFIG_BLK_DEV_NVME=m): installed from the tree, put in
/// the image and loaded, its namespace is a disk.
#[test]
fn a_failing_command_returns_its_status_and_its_output_on_each_kernel() {
    let tree_arg = tree().display().to_string();
    let out = runner(&[
        "--kernel",
        "debian",
        "--kernel",
        &tree_arg,
        "--name",
        "run-fails",
        "--arg=--nvme",
        "--arg=backend=null,size=64M",
        "--run",
        "test -b /dev/nvme0n1 && echo nvme0n1-is-a-disk; echo to-stdout; echo to-stderr >&2; exit 7",
        "--fetch",
        "/root/never-written",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(7), "{text}");
    let both = |want: &str| assert_eq!(text.matches(want).count(), 2, "{want:?} twice in:\n{text}");
    both("run| nvme0n1-is-a-disk\nrun| to-stdout\nrun| to-stderr\n");
    both("command:     exit status 7");
    both("fetched:     /root/never-written: FAILED: no such file");
    assert!(guest(&text, "error").is_none(), "a guest error: {text}");
    // The matrix: one row per kernel, each clean, status 7, one disk.
    let debian = std::fs::read_to_string(repo().join(".cache/guest/kernel-version"))
        .expect("the cache's kernel version");
    let own = UserKernel::open(tree()).unwrap().release;
    let matrix = text
        .split("== kernel matrix: scenario=run\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no matrix in:\n{text}"));
    for release in [debian.trim(), own.as_str()] {
        let row: Vec<&str> = matrix
            .lines()
            .find(|l| l.starts_with(release))
            .unwrap_or_else(|| panic!("no row for {release} in:\n{matrix}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[1..4], ["clean", "7", "1"], "{row:?}");
    }
}

/// The runner exits 2 before booting anything, saying each of `why`.
fn refused(args: &[&str], why: &[&str]) {
    let out = runner(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("harness: using"), "it went on to boot: {err}");
    for why in why {
        assert!(err.contains(why), "want {why:?} in:\n{err}");
    }
}

#[test]
fn bad_kernels_and_modules_are_refused_before_anything_boots() {
    let dir = std::env::temp_dir().join(format!("blkswarm-bad-kernel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = |p: &str| dir.join(p).display().to_string();
    // A tree that was never built.
    std::fs::create_dir_all(dir.join("unbuilt")).unwrap();
    std::fs::write(dir.join("unbuilt/Makefile"), "").unwrap();
    std::fs::write(dir.join("unbuilt/Kconfig"), "").unwrap();
    refused(
        &["--kernel", &d("unbuilt")],
        &["is a kernel tree that has not been built (run `make bzImage` in it)"],
    );
    // The real tree with Debian's 6.12 modules.
    let tree = tree();
    let tree_arg = tree.display().to_string();
    let debian = repo().join(".cache/kernel/root").display().to_string();
    refused(
        &[
            "--kernel",
            &tree_arg,
            "--arg=--nvme",
            "--arg=backend=null",
            "--modules",
            &debian,
        ],
        &["modules of another kernel (6.12."],
    );
    // The tree's bzImage with a config that lacks virtio PCI and AIO.
    std::fs::create_dir_all(dir.join("bad/arch/x86/boot")).unwrap();
    std::fs::copy(
        tree.join("arch/x86/boot/bzImage"),
        dir.join("bad/arch/x86/boot/bzImage"),
    )
    .unwrap();
    let config = std::fs::read_to_string(tree.join(".config")).unwrap();
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("CONFIG_VIRTIO_PCI=") && !l.starts_with("CONFIG_AIO="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join("bad/.config"), config).unwrap();
    refused(
        &["--kernel", &d("bad"), "--arg=--disk", "--arg=backend=null"],
        &[
            "CONFIG_VIRTIO_PCI (virtio-blk disks are virtio PCI functions; not set)",
            "CONFIG_AIO (fio's libaio engine; not set)",
        ],
    );
    // The kernel builds NVMe as a module; a bare bzImage copy has none to load.
    std::fs::copy(tree.join("arch/x86/boot/bzImage"), dir.join("bzImage")).unwrap();
    let release = UserKernel::open(tree).unwrap().release;
    std::fs::copy(tree.join(".config"), dir.join(format!("config-{release}"))).unwrap();
    refused(
        &[
            "--kernel",
            &d("bzImage"),
            "--arg=--nvme",
            "--arg=backend=null",
        ],
        &["builds nvme as a module (CONFIG_BLK_DEV_NVME=m), but there are no modules"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
