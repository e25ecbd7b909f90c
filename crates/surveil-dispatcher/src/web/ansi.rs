//! ANSI colour codes in a log, as HTML: SGR sequences (bold, the 8 and
//! bright colours, 256-colour and RGB foregrounds and backgrounds) become
//! `<span>`s with classes or inline colours; every other escape sequence
//! is dropped; text is HTML-escaped. A pure function over a line, so the
//! page can number and anchor lines itself. The same rules are mirrored
//! in the live script for lines that arrive later.

use std::fmt::Write;

/// The style in force after the sequences seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Style {
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
    fg: Option<Colour>,
    bg: Option<Colour>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Colour {
    /// One of the 16 named colours (0-15).
    Named(u8),
    /// An RGB value from a 256-colour or true-colour code.
    Rgb(u8, u8, u8),
}

impl Style {
    fn is_plain(&self) -> bool {
        *self == Style::default()
    }

    fn open(&self, out: &mut String) {
        let mut classes = Vec::new();
        let mut css = String::new();
        for (on, class) in [
            (self.bold, "b"),
            (self.dim, "d"),
            (self.italic, "i"),
            (self.underline, "u"),
        ] {
            if on {
                classes.push(class.to_owned());
            }
        }
        for (colour, prefix, prop) in [(&self.fg, "f", "color"), (&self.bg, "g", "background")] {
            match colour {
                Some(Colour::Named(n)) => classes.push(format!("{prefix}{n}")),
                Some(Colour::Rgb(r, g, b)) => {
                    let _ = write!(css, "{prop}:#{r:02x}{g:02x}{b:02x};");
                }
                None => {}
            }
        }
        out.push_str("<span");
        if !classes.is_empty() {
            let _ = write!(out, " class=\"{}\"", classes.join(" "));
        }
        if !css.is_empty() {
            let _ = write!(out, " style=\"{css}\"");
        }
        out.push('>');
    }

    fn apply(&mut self, params: &[u32]) {
        let mut i = 0;
        if params.is_empty() {
            *self = Style::default();
        }
        while i < params.len() {
            match params[i] {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => (self.bold, self.dim) = (false, false),
                23 => self.italic = false,
                24 => self.underline = false,
                n @ 30..=37 => self.fg = Some(Colour::Named((n - 30) as u8)),
                n @ 90..=97 => self.fg = Some(Colour::Named((n - 90 + 8) as u8)),
                n @ 40..=47 => self.bg = Some(Colour::Named((n - 40) as u8)),
                n @ 100..=107 => self.bg = Some(Colour::Named((n - 100 + 8) as u8)),
                39 => self.fg = None,
                49 => self.bg = None,
                n @ (38 | 48) => {
                    let (colour, used) = extended(&params[i + 1..]);
                    i += used;
                    if n == 38 {
                        self.fg = colour;
                    } else {
                        self.bg = colour;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// `5;N` (256 colours) or `2;R;G;B`: the colour and the parameters used.
fn extended(rest: &[u32]) -> (Option<Colour>, usize) {
    let byte = |v: u32| u8::try_from(v.min(255)).unwrap_or(255);
    match rest {
        [5, n, ..] => (Some(palette(byte(*n))), 2),
        [2, r, g, b, ..] => (Some(Colour::Rgb(byte(*r), byte(*g), byte(*b))), 4),
        _ => (None, rest.len()),
    }
}

fn palette(n: u8) -> Colour {
    match n {
        0..=15 => Colour::Named(n),
        16..=231 => {
            let n = n - 16;
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            Colour::Rgb(level(n / 36), level(n / 6 % 6), level(n % 6))
        }
        _ => {
            let v = 8 + (n - 232) * 10;
            Colour::Rgb(v, v, v)
        }
    }
}

fn escape(c: char, out: &mut String) {
    match c {
        '&' => out.push_str("&amp;"),
        '<' => out.push_str("&lt;"),
        '>' => out.push_str("&gt;"),
        '"' => out.push_str("&quot;"),
        '\'' => out.push_str("&#39;"),
        c => out.push(c),
    }
}

/// One line of log (no `\n`) as HTML, starting in `style` and leaving it
/// as the line's sequences changed it (colours may span lines).
pub fn line_to_html(line: &str, style: &mut Style) -> String {
    let mut out = String::with_capacity(line.len() + 16);
    let mut open = !style.is_plain();
    if open {
        style.open(&mut out);
    }
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            if c != '\r' {
                escape(c, &mut out);
            }
            continue;
        }
        if chars.peek() != Some(&'[') {
            chars.next(); // a two-character escape: dropped
            continue;
        }
        chars.next();
        let mut body = String::new();
        let mut last = None;
        for c in chars.by_ref() {
            if ('\u{40}'..='\u{7e}').contains(&c) {
                last = Some(c);
                break;
            }
            body.push(c);
        }
        if last != Some('m') {
            continue; // cursor movement and the like: dropped
        }
        let params: Vec<u32> = body
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        style.apply(&params);
        if open {
            out.push_str("</span>");
        }
        open = !style.is_plain();
        if open {
            style.open(&mut out);
        }
    }
    if open {
        out.push_str("</span>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_become_spans_and_text_is_escaped() {
        let mut style = Style::default();
        assert_eq!(
            line_to_html("\u{1b}[1;31mFAIL\u{1b}[0m <a> & b", &mut style),
            "<span class=\"b f1\">FAIL</span> &lt;a&gt; &amp; b"
        );
        assert!(style.is_plain());
        let html = line_to_html("\u{1b}[38;5;196mred\u{1b}[2K", &mut style);
        assert_eq!(html, "<span style=\"color:#ff0000;\">red</span>");
        // The colour carries over to the next line until reset.
        assert_eq!(
            line_to_html("still\u{1b}[m", &mut style),
            "<span style=\"color:#ff0000;\">still</span>"
        );
        assert_eq!(
            line_to_html("\u{1b}[92mok", &mut style),
            "<span class=\"f10\">ok</span>"
        );
    }
}
