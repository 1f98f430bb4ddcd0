//! Guest text on the user's terminal. A guest can print anything into its
//! console or error messages — escape sequences that write the clipboard
//! (OSC 52), clear the screen, move the cursor over earlier output or fake
//! a prompt. Everything smolvm shows from a guest goes through here: control
//! characters come out as visible escapes (`\x1b`, `\u{9b}`), so what a
//! person sees is exactly what the guest sent and the terminal acts on none
//! of it.

use std::fmt::Write as _;
use std::path::Path;

/// True for characters a terminal may act on: C0 and C1 controls, DEL, and
/// the Unicode bidirectional overrides and isolates (which reorder what is
/// shown, "Trojan Source").
/// Control characters, and the invisible ones that reorder or break what a
/// terminal shows (bidi embeddings, overrides, isolates and marks; line and
/// paragraph separators).
fn is_dangerous(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{061c}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

fn push_escaped(out: &mut String, c: char) {
    let n = c as u32;
    if n < 0x80 {
        let _ = write!(out, "\\x{n:02x}");
    } else {
        let _ = write!(out, "\\u{{{n:x}}}");
    }
}

/// `s` with every control character escaped except newline and tab (a
/// carriage return before a newline is dropped, the rest are escaped).
pub fn escape_multiline(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' if chars.peek() == Some(&'\n') => {}
            c if is_dangerous(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    out
}

/// `s` on one line: every control character escaped, newlines included.
pub fn escape_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_dangerous(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes from a guest (not necessarily UTF-8) as safe multi-line text:
/// invalid UTF-8 shows as U+FFFD.
pub fn escape_bytes(b: &[u8]) -> String {
    escape_multiline(&String::from_utf8_lossy(b))
}

/// Incremental [`escape_bytes`] for a byte stream cut at arbitrary points
/// (`smolvm logs -f`): a UTF-8 sequence or CR LF split across chunks is
/// held back until the next chunk completes it.
#[derive(Default)]
pub struct StreamEscaper {
    pending: Vec<u8>,
}

impl StreamEscaper {
    /// Escapes the complete part of `pending + chunk`; keeps an incomplete tail.
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let mut cut = self.pending.len();
        // Hold back an incomplete UTF-8 sequence (at most 3 bytes).
        match std::str::from_utf8(&self.pending) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => cut = e.valid_up_to(),
            Err(_) => {}
        }
        // Hold back a trailing CR: it may be the first half of CR LF.
        if cut > 0 && self.pending[cut - 1] == b'\r' {
            cut -= 1;
        }
        let rest = self.pending.split_off(cut);
        let out = escape_bytes(&self.pending);
        self.pending = rest;
        out
    }

    /// Escapes whatever is still held back (the end of the stream).
    pub fn finish(&mut self) -> String {
        let out = escape_bytes(&self.pending);
        self.pending.clear();
        out
    }
}

/// Last `max` bytes of a file, lossily decoded (for error messages). Reads
/// only the tail, however large the file.
pub fn tail_file(path: &Path, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut b = Vec::with_capacity(usize::try_from(max.min(len)).unwrap_or(0));
    let _ = f.take(max).read_to_end(&mut b);
    String::from_utf8_lossy(&b).trim().to_string()
}

/// Last `lines` non-empty lines of a text file (the guest console log).
pub fn tail_lines(path: &Path, lines: usize) -> String {
    let t = tail_file(path, 16 * 1024);
    let v: Vec<&str> = t
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_terminal_controls() {
        let osc52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07";
        let e = escape_multiline(&format!("ok\r\n{osc52}\x1b[2Jx\u{9b}31m\u{202e}"));
        assert_eq!(
            e,
            "ok\n\\x1b]52;c;ZWNobyBwd25lZA==\\x07\\x1b[2Jx\\u{9b}31m\\u{202e}"
        );
        assert!(!e.chars().any(|c| c.is_control() && c != '\n'));
        assert_eq!(escape_line("a\nb\tc\x7f"), "a\\x0ab\\x09c\\x7f");
        assert_eq!(
            escape_line("x\u{200f}y\u{2028}z\u{061c}"),
            "x\\u{200f}y\\u{2028}z\\u{61c}"
        );
        assert_eq!(escape_multiline("lone\rcr"), "lone\\x0dcr");
        assert_eq!(escape_multiline("tab\tünïcode"), "tab\tünïcode");
    }

    #[test]
    fn stream_escaper_matches_whole_escape_at_any_split() {
        let input = "é\r\n\x1b[31mred\u{9b}€ end\r".as_bytes();
        let whole = escape_bytes(input);
        for cut in 0..=input.len() {
            let mut s = StreamEscaper::default();
            let mut got = s.push(&input[..cut]);
            got.push_str(&s.push(&input[cut..]));
            got.push_str(&s.finish());
            assert_eq!(got, whole, "split at {cut}");
        }
    }

    #[test]
    fn invalid_utf8_is_replaced_not_passed() {
        assert_eq!(escape_bytes(b"a\xff\x1bb"), "a\u{fffd}\\x1bb");
    }
}
