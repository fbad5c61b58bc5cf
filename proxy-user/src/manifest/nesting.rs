//! How deeply a YAML document nests, bounded from above by a scan of its text before the YAML
//! parser sees it. The parser's time grows with the square of the nesting of flow collections
//! (200,000 `[` took 72 s, 40,000 took 3.2 s) and its memory with any nesting (a line of 400,000
//! `- ` took 127 MB), and it reports "recursion limit exceeded" only after all that work.
//!
//! The bound counts the block nodes enclosing a line (by indentation, plus `- `, `? ` and `: `
//! indicators on it) and the flow collections open around a token. Quoted scalars, comments and
//! block scalars are skipped, so brackets in text do not count. Anything the scan misreads can
//! only be odd YAML, and the document size limit still bounds it.

/// The 1-based line of `text` where its nesting first goes past `limit` levels, if it does.
pub(super) fn too_deep(text: &str, limit: usize) -> Option<usize> {
    let mut scanner = Scanner::default();
    text.lines()
        .position(|line| scanner.line(line.as_bytes()) > limit)
        .map(|i| i + 1)
}

#[derive(Default)]
struct Scanner {
    /// Indentation of the block lines enclosing the current one.
    indents: Vec<usize>,
    /// Block nodes enclosing the current token.
    block_depth: usize,
    /// Open flow collections, and the block depth the outermost one was opened at.
    flow: usize,
    flow_base: usize,
    /// The next token starts a node: only there do `[`, `{`, quotes and `|` mean something.
    node_start: bool,
    /// Inside a quoted scalar that goes on past the end of its line.
    quote: Option<u8>,
    /// Inside a block scalar: lines indented more than this column (or blank) are its text.
    block_scalar: Option<isize>,
}

fn is_blank(b: Option<&u8>) -> bool {
    matches!(b, None | Some(b' ' | b'\t'))
}

impl Scanner {
    /// Scans one line; returns the deepest nesting seen on it.
    fn line(&mut self, line: &[u8]) -> usize {
        let indent = line.iter().take_while(|b| **b == b' ').count();
        let blank = line[indent..].iter().all(|b| matches!(b, b' ' | b'\t'));
        if let Some(parent) = self.block_scalar {
            if blank || indent as isize > parent {
                return 0;
            }
            self.block_scalar = None;
        }
        let mut i = 0;
        // Where the node of this line starts, and where its last `- ` / `? ` indicator is: a
        // block scalar's text is indented past one or the other.
        let mut key_col = None;
        let mut indicator_col: isize = -1;
        if self.quote.is_none() && self.flow == 0 {
            if blank || line[indent] == b'#' {
                return 0;
            }
            while self.indents.last().is_some_and(|top| *top >= indent) {
                self.indents.pop();
            }
            self.indents.push(indent);
            self.block_depth = self.indents.len();
            i = indent;
            while matches!(line.get(i), Some(b'-' | b'?' | b':')) && is_blank(line.get(i + 1)) {
                self.block_depth += 1;
                indicator_col = i as isize;
                i += 1;
                while matches!(line.get(i), Some(b' ' | b'\t')) {
                    i += 1;
                }
            }
            self.node_start = true;
        }
        let mut deepest = self.block_depth + self.flow;
        let first = i;
        while i < line.len() {
            let b = line[i];
            if let Some(quote) = self.quote {
                match (quote, b) {
                    // `''` is a quote inside single quotes, `\x` any escape inside double ones.
                    (b'\'', b'\'') if line.get(i + 1) == Some(&b'\'') => i += 1,
                    (b'"', b'\\') => i += 1,
                    (q, b) if q == b => {
                        self.quote = None;
                        self.node_start = false;
                    }
                    _ => {}
                }
                i += 1;
                continue;
            }
            let next = line.get(i + 1);
            match b {
                b' ' | b'\t' => {}
                b'#' if i == 0 || matches!(line[i - 1], b' ' | b'\t') => break,
                b'"' | b'\'' if self.node_start => self.quote = Some(b),
                // Anchors and tags come before the node they name.
                b'&' | b'!' if self.node_start => {
                    while i + 1 < line.len()
                        && !matches!(line[i + 1], b' ' | b'\t' | b',' | b'[' | b']' | b'{' | b'}')
                    {
                        i += 1;
                    }
                }
                b'[' | b'{' if self.flow > 0 || self.node_start => {
                    if self.flow == 0 {
                        self.flow_base = self.block_depth;
                    }
                    self.flow += 1;
                    deepest = deepest.max(self.flow_base + self.flow);
                    self.node_start = true;
                }
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    self.node_start = false;
                }
                b',' if self.flow > 0 => self.node_start = true,
                // In flow collections `:` may touch its value (`{"a":1}`).
                b':' if self.flow > 0 => self.node_start = true,
                b':' | b'?' | b'-' if is_blank(next) && (b == b':' || self.node_start) => {
                    if b == b':' && key_col.is_none() {
                        key_col = line[first..i]
                            .iter()
                            .position(|c| !matches!(c, b' ' | b'\t'))
                            .map(|p| (first + p) as isize);
                    }
                    self.block_depth += 1;
                    deepest = deepest.max(self.block_depth);
                    self.node_start = true;
                }
                b'|' | b'>' if self.flow == 0 && self.node_start => {
                    let header_ends = line[i + 1..]
                        .iter()
                        .position(|c| !matches!(c, b'-' | b'+' | b'0'..=b'9'))
                        .map_or(line.len(), |p| i + 1 + p);
                    if is_blank(line.get(header_ends)) {
                        self.block_scalar = Some(key_col.unwrap_or(indicator_col));
                        break;
                    }
                    self.node_start = false;
                }
                _ => self.node_start = false,
            }
            i += 1;
        }
        deepest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(text: &str) -> usize {
        let mut scanner = Scanner::default();
        text.lines()
            .map(|l| scanner.line(l.as_bytes()))
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn kubernetes_objects_are_shallow() {
        for text in [
            include_str!("../../tests/fixtures/objects.yaml"),
            include_str!("../../tests/fixtures/seeds/001-myapp-proxy.yaml"),
            include_str!("../../tests/fixtures/k8s-api/list-services.json"),
            include_str!("../../tests/fixtures/k8s-api/list-endpointslices.json"),
        ] {
            let d = depth(text);
            assert!((2..16).contains(&d), "{d}");
        }
    }

    #[test]
    fn flow_and_block_nesting_count() {
        assert_eq!(depth("a: 1"), 2);
        assert_eq!(depth("a: [1, [2, {b: [3]}]]"), 6);
        assert_eq!(depth("- - - x"), 4);
        assert_eq!(depth("a:\n  b:\n    c: d"), 4);
        assert_eq!(depth("a: [\n  [\n    [1]\n  ]\n]\nb: 2"), 5);
        assert_eq!(depth("- {\"a\":[{\"b\":1}]}"), 5);
        assert_eq!(
            depth(&format!("a: {}{}", "[".repeat(50), "]".repeat(50))),
            52
        );
    }

    #[test]
    fn text_is_not_structure() {
        let text = r#"
a: "[[[[[[[[[[ {{{{ "
b: '[[[[ it''s [[[['
c: plain [[[[ text {{{{
d: x # comment [[[[[[
e: |
  [[[[[[[[[[[[[[[[[[[[
  - - - - - - - - - - - -
f: >-
    {{{{{{{{{{{{{{{
g: "multi line
  [[[[[[[[[[[[[[[[[[
  still quoted"
- key: |
    [[[[[[[[[[[[[[[[
  other: 1
"#;
        assert!(depth(text) <= 3, "{}", depth(text));
    }

    #[test]
    fn text_after_a_block_scalar_is_scanned_again() {
        let text = format!("- key: |\n    text\n  other: {}", "[".repeat(100));
        assert_eq!(too_deep(&text, 64), Some(3));
    }

    #[test]
    fn deep_nesting_is_found_on_its_line_and_quickly() {
        let text = format!("a: 1\nb: {}{}", "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(too_deep(&text, 64), Some(2));
        let text = format!("{}x", "- ".repeat(400_000));
        assert_eq!(too_deep(&text, 64), Some(1));
        let text = format!("a: 1\nb: {}", "{a: ".repeat(100));
        assert_eq!(too_deep(&text, 64), Some(2));
        assert_eq!(too_deep("a: [[[1]]]", 64), None);
    }
}
