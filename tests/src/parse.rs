//! Parsing of the machine-readable console lines:
//! `@@guest key=value` (one fact per line, from the test guest),
//! `@@vmm key=value ...` (from blkswarm's stderr),
//! `@@lab word key=value ...` (from the lab's L1 /init and plan runner).

/// Prefix of guest result lines.
pub const GUEST: &str = "@@guest";
/// Prefix of VMM lines.
pub const VMM: &str = "@@vmm";
/// Prefix of lab lines.
pub const LAB: &str = "@@lab";

/// A console line as received, made safe to print and parse: terminal escape
/// sequences (firmware sends `ESC c`, `ESC [2J`, ...) and control characters other
/// than tab removed (so `\r` from `\r\n` too), surrounding whitespace trimmed.
pub fn clean_line(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte in @..~
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                // Two-character sequences (ESC c, ESC 7, ...).
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.trim().to_string()
}

/// If the cleaned `line` starts with the word `prefix` (followed by whitespace or the
/// end of the line), returns the rest, trimmed. `@@guestX` does not match `@@guest`.
pub fn tagged<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(prefix)?;
    if rest.is_empty() {
        return Some("");
    }
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    Some(rest.trim())
}

/// One guest fact: `key=value` where the value is the rest of the line (it may hold
/// spaces, e.g. a kernel version string); a bare word (`done`) has an empty value.
pub fn fact(body: &str) -> Option<(String, String)> {
    let body = body.trim();
    if body.is_empty() {
        return None;
    }
    match body.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Some((k.to_string(), v.trim().to_string()))
        }
        _ => Some((body.to_string(), String::new())),
    }
}

/// Space-separated `key=value` pairs; a bare word becomes `(word, "")`, so
/// `exit reason=poweroff` gives `[("exit", ""), ("reason", "poweroff")]`.
pub fn pairs(body: &str) -> Vec<(String, String)> {
    body.split_whitespace()
        .map(|tok| match tok.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (tok.to_string(), String::new()),
        })
        .collect()
}

/// The value of `key` in `pairs` (first occurrence).
pub fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Guest facts and VMM pairs collected from a stream of console lines.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Collected {
    pub results: Vec<(String, String)>,
    pub vmm: Vec<(String, String)>,
    pub done: bool,
}

impl Collected {
    /// Feeds one raw line; returns true when it was a `@@guest`/`@@vmm` line.
    pub fn feed(&mut self, raw: &str) -> bool {
        let line = clean_line(raw);
        if let Some(body) = tagged(&line, GUEST) {
            if let Some((k, v)) = fact(body) {
                if k == "done" && v.is_empty() {
                    self.done = true;
                }
                self.results.push((k, v));
            }
            true
        } else if let Some(body) = tagged(&line, VMM) {
            self.vmm.extend(pairs(body));
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn guest_lines_with_cr_and_noise() {
        let console = "\r\n[    0.512345] random: crng init done\r\n\
            @@guest scenario=boot\r\n\
            @@guest kernel=6.12.117+deb12-amd64\r\r\n\
            \t@@guest cpus_online=0-1  \n\
            some noise @@guest nproc=99\n\
            @@guestfoo=1\n\
            @@guest nproc=2\r\n\
            @@vmm first_run_us=1234\n\
            @@vmm exit reason=poweroff\r\n\
            @@guest\n\
            @@guest msg=a b=c\n\
            @@guest done\r";
        let mut c = Collected::default();
        for l in console.split('\n') {
            c.feed(l);
        }
        assert_eq!(
            c.results,
            [
                kv("scenario", "boot"),
                kv("kernel", "6.12.117+deb12-amd64"),
                kv("cpus_online", "0-1"),
                kv("nproc", "2"),
                kv("msg", "a b=c"),
                kv("done", ""),
            ]
        );
        assert_eq!(
            c.vmm,
            [
                kv("first_run_us", "1234"),
                kv("exit", ""),
                kv("reason", "poweroff")
            ]
        );
        assert!(c.done);
        assert_eq!(lookup(&c.vmm, "reason"), Some("poweroff"));
    }

    #[test]
    fn escapes_and_controls_are_removed() {
        assert_eq!(
            clean_line("\u{1b}c\u{1b}[?7l\u{1b}[2J@@lab kvm=ok\r"),
            "@@lab kvm=ok"
        );
        assert_eq!(
            clean_line("\u{1b}[0mSeaBIOS (version 1)"),
            "SeaBIOS (version 1)"
        );
        assert_eq!(clean_line("\u{1b}]0;title\u{7}a\u{8}b\tc"), "ab\tc");
        assert_eq!(clean_line("x\u{1b}"), "x");
    }

    #[test]
    fn done_must_be_bare() {
        let mut c = Collected::default();
        c.feed("@@guest done=no");
        c.feed("@@guest undone");
        assert!(!c.done);
    }

    #[test]
    fn lab_pairs() {
        let line = clean_line("@@lab guest-end name=boot_1cpu rc=0 wall_ms=9123\r");
        let p = pairs(tagged(&line, LAB).unwrap());
        assert_eq!(p[0], kv("guest-end", ""));
        assert_eq!(lookup(&p, "name"), Some("boot_1cpu"));
        assert_eq!(lookup(&p, "rc"), Some("0"));
        assert_eq!(lookup(&p, "wall_ms"), Some("9123"));
        assert_eq!(tagged("@@lab", LAB), Some(""));
        assert_eq!(tagged("@@labs x", LAB), None);
        assert_eq!(fact("odd key=v"), Some(kv("odd key=v", "")));
    }
}
