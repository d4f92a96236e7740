//! Aligned text tables for `list`-style commands.

const GAP: usize = 2;
const MIN_SHRUNK: usize = 12;

/// Aligns the columns. With `fit = Some((width, col))`, column `col` is shortened
/// from the left (the end of a path is the part that tells rows apart) so that each
/// line fits in `width` characters.
pub fn render(headers: &[&str], rows: &[Vec<String>], fit: Option<(usize, usize)>) -> String {
    let len = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = headers.iter().map(|h| len(h)).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(len(cell));
        }
    }
    if let Some((total, col)) = fit {
        let others: usize = widths
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != col)
            .map(|(_, w)| w)
            .sum();
        let avail = total.saturating_sub(others + GAP * (headers.len() - 1));
        widths[col] = widths[col].min(avail.max(MIN_SHRUNK));
    }
    let shrink = fit.map(|(_, c)| c);
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            let cell = if Some(i) == shrink {
                shorten_left(cell, widths[i])
            } else {
                cell.clone()
            };
            line.push_str(&cell);
            if i + 1 < r.len() {
                line.extend(std::iter::repeat_n(' ', widths[i] + GAP - len(&cell)));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn shorten_left(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_string();
    }
    let keep = width.saturating_sub(1);
    let tail: String = s.chars().skip(n - keep).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_and_fits() {
        let row = |d: &str| vec!["id-1".to_string(), d.to_string(), "stopped".to_string()];
        let rows = vec![
            row("/home/al/a-very-long-project-directory-name"),
            row("/p"),
        ];
        let wide = render(&["ID", "DIRECTORY", "STATE"], &rows, None);
        let lines: Vec<&str> = wide.lines().collect();
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("stopped"), Some(col));
        assert_eq!(lines[2].find("stopped"), Some(col));
        let narrow = render(&["ID", "DIRECTORY", "STATE"], &rows, Some((40, 1)));
        for l in narrow.lines() {
            assert!(l.chars().count() <= 40, "{l:?}");
        }
        assert!(
            narrow.contains("…") && narrow.contains("directory-name"),
            "{narrow}"
        );
    }
}
