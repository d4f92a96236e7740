//! Positions in TOML text, so that every parse or validation error can name
//! `file:line:column`.

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Where a `toml` parse error points.
pub fn error_line_col(text: &str, e: &toml::de::Error) -> (usize, usize) {
    line_col(text, e.span().map_or(0, |s| s.start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_characters_not_bytes() {
        assert_eq!(line_col("ab\nçd", 5), (2, 2));
        assert_eq!(line_col("", 0), (1, 1));
        assert_eq!(line_col("x", 99), (1, 2));
    }
}
