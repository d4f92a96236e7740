//! Text that reaches the host terminal from places the guest can write (paths,
//! config keys and values, guest reports, branch names) may carry escape sequences
//! that move the cursor, rewrite what was printed, or set the window title, and
//! bidi or zero-width characters that make it read as something else. Every such
//! character is shown as a visible `\u{..}` escape instead.

use std::borrow::Cow;

/// Unicode format and invisible characters (bidi overrides, zero-width, line
/// separators, variation selectors, tags, fillers) that make text print as
/// something it is not.
pub fn is_format_char(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}' | '\u{E0000}'..='\u{E0FFF}')
}

fn unsafe_char(c: char) -> bool {
    c.is_control() || is_format_char(c)
}

/// `s` with every control and format character escaped; borrowed when clean.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_what_a_terminal_would_act_on() {
        assert_eq!(escape("plain /path é"), "plain /path é");
        assert_eq!(escape("a\x1b]0;pwned\x07b"), "a\\u{1b}]0;pwned\\u{7}b");
        assert_eq!(escape("x\ny\tz\r"), "x\\u{a}y\\u{9}z\\u{d}");
        assert_eq!(escape("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        for c in ['\u{2028}', '\u{e0041}', '\u{fe0f}', '\u{3164}'] {
            assert!(escape(&format!("a{c}b")).starts_with("a\\u{"), "{c:?}");
        }
    }

    proptest! {
        #[test]
        fn output_has_no_control_or_format_chars(s in any::<String>()) {
            let e = escape(&s);
            prop_assert!(!e.chars().any(unsafe_char));
            // Clean text is left as it is.
            if !s.chars().any(unsafe_char) {
                prop_assert_eq!(e.as_ref(), s.as_str());
            }
        }
    }
}
