//! POSIX shell quoting for the generated lab plan.

/// Quotes `arg` as one POSIX shell word. Words made only of characters that are never
/// special to the shell stay bare (readable plans); anything else is put in single
/// quotes, with each `'` written as `'\''`. The empty string becomes `''`.
pub fn quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./,:=+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_string();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Quotes every word and joins them with spaces.
pub fn join<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("/lab/blkswarm"), "/lab/blkswarm");
        assert_eq!(quote("boot=2,max=8"), "boot=2,max=8");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("'"), "''\\'''");
        assert_eq!(quote("$HOME"), "'$HOME'");
        assert_eq!(quote("a\nb"), "'a\nb'");
        assert_eq!(quote("*"), "'*'");
        assert_eq!(quote("~"), "'~'");
        assert_eq!(join(&["echo", "", "x y"]), "echo '' 'x y'");
    }

    /// The real test: a shell must give back exactly the words we quoted.
    #[test]
    fn sh_reads_back_the_same_words() {
        let words = [
            "",
            "plain",
            "two words",
            "it's",
            "''",
            "\"dq\"",
            "$HOME `id` $(id)",
            "back\\slash",
            "tab\tand\nnewline",
            "*?[a]",
            "-n",
            "console=ttyS0 quiet panic=-1 blkswarm.scenario=boot",
        ];
        let script = format!("for a in {}; do printf '%s\\0' \"$a\"; done", join(&words));
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("run sh");
        assert!(out.status.success(), "{out:?}");
        let got: Vec<String> = out
            .stdout
            .split(|&b| b == 0)
            .map(|w| String::from_utf8(w.to_vec()).unwrap())
            .collect();
        let mut want: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        want.push(String::new()); // after the last NUL
        assert_eq!(got, want);
    }
}
