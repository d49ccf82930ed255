//! This tool's terminal output: its own status lines and the `name | ` prefixes of the
//! processes it runs, padded to one width and coloured when stdout is a terminal.
//!
//! Every line is written whole under the stdout lock, so the lines of this tool and of the
//! processes (forwarded by the testkit, see `ChildProcess::spawn_forwarding`) never interleave
//! mid-line. Write errors (a closed pipe) are ignored: output is a convenience, and the
//! processes must keep running and be stopped properly either way.

use std::fmt::Display;
use std::io::{IsTerminal as _, Write as _};

/// The name this tool prints its own lines under.
const OWN_NAME: &str = "orderflow";
/// ANSI foreground colours for the processes, in order (cyan, yellow, magenta, green, blue,
/// bright red, bright cyan, bright yellow, bright magenta).
const PALETTE: [&str; 9] = ["36", "33", "35", "32", "34", "91", "96", "93", "95"];
/// ANSI bold, for this tool's own prefix.
const OWN_STYLE: &str = "1";

/// Prints status lines and makes the per-process prefixes.
#[derive(Debug, Clone)]
pub struct Console {
    color: bool,
    /// Width the names are padded to (the longest name).
    width: usize,
}

impl Console {
    /// A console for processes named `names`: colour when stdout is a terminal and `NO_COLOR`
    /// is unset or empty (<https://no-color.org>).
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self::with_color(names, std::io::stdout().is_terminal() && !no_color)
    }

    fn with_color<'a>(names: impl IntoIterator<Item = &'a str>, color: bool) -> Self {
        let width = names
            .into_iter()
            .map(str::len)
            .chain([OWN_NAME.len()])
            .max()
            .unwrap_or(OWN_NAME.len());
        Self { color, width }
    }

    /// The prefix of process number `index`: `"<name padded> | "`, coloured.
    pub fn prefix(&self, name: &str, index: usize) -> String {
        self.styled_prefix(name, PALETTE[index % PALETTE.len()])
    }

    fn styled_prefix(&self, name: &str, style: &str) -> String {
        let width = self.width;
        if self.color {
            format!("\x1b[{style}m{name:<width$} |\x1b[0m ")
        } else {
            format!("{name:<width$} | ")
        }
    }

    /// Prints `message` (each of its lines) under this tool's own prefix.
    pub fn say(&self, message: impl Display) {
        let prefix = self.styled_prefix(OWN_NAME, OWN_STYLE);
        let text = message.to_string();
        let mut out = std::io::stdout().lock();
        for line in text.lines() {
            let _ = writeln!(out, "{prefix}{line}");
        }
    }

    /// Prints `text` as it is, without prefixes (the summary and the curl commands, which
    /// should copy and paste cleanly).
    pub fn plain(text: impl Display) {
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    }

    /// Prints the last lines of a process's log under a header naming it.
    pub fn log_tail(name: &str, tail: &str) {
        let tail = if tail.trim().is_empty() {
            "<no output>"
        } else {
            tail
        };
        Self::plain(format!(
            "----- last lines of {name} -----\n{tail}\n----- end of {name} -----"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_padded_to_the_longest_name() {
        let console = Console::with_color(["order-service", "payment-provider-sim"], false);
        assert_eq!(
            console.prefix("order-service", 0),
            "order-service        | "
        );
        assert_eq!(
            console.prefix("payment-provider-sim", 1),
            "payment-provider-sim | "
        );
    }

    #[test]
    fn colour_wraps_the_name_and_bar() {
        let console = Console::with_color(["ab"], true);
        assert_eq!(console.prefix("ab", 0), "\x1b[36mab        |\x1b[0m ");
        assert_eq!(
            console.prefix("ab", 9),
            console.prefix("ab", 0),
            "the palette cycles"
        );
    }
}
