//! Bytes of a regulation document → lines of text.
//!
//! Plain text may be UTF-8 (with or without BOM), UTF-16 with BOM, or GB18030/GBK; Word files
//! give one line per paragraph; PDFs give the lines of their text layer.

use std::io::{Cursor, Read};

use quick_xml::{Reader, events::Event};

use crate::ErrorKind;

/// The formats `extract` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Docx,
    Pdf,
}

impl Format {
    /// The format for a file name's extension, if it names one we read.
    pub fn from_extension(ext: &str) -> Option<Format> {
        match ext.to_ascii_lowercase().as_str() {
            "txt" | "text" | "md" | "markdown" => Some(Format::Text),
            "docx" => Some(Format::Docx),
            "pdf" => Some(Format::Pdf),
            _ => None,
        }
    }

    /// Guesses the format from the first bytes, for files with no known extension.
    pub fn sniff(bytes: &[u8]) -> Format {
        if bytes.starts_with(b"%PDF-") {
            Format::Pdf
        } else if bytes.starts_with(b"PK\x03\x04") {
            Format::Docx
        } else {
            Format::Text
        }
    }
}

/// One line of the document's text, and whether the source marked it as a heading (a Markdown
/// `#` line, or a Word paragraph in a Title/Heading style).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    pub heading: bool,
}

/// Decodes `bytes` as `format` into lines (markers such as `#` stripped).
pub fn decode(bytes: &[u8], format: Format) -> Result<Vec<Line>, ErrorKind> {
    let lines = match format {
        Format::Text => text_lines(&decode_text(bytes)?),
        Format::Docx => docx_lines(bytes)?,
        Format::Pdf => pdf_lines(bytes)?,
    };
    if lines.iter().all(|l| l.text.trim().is_empty()) {
        return Err(match format {
            Format::Pdf => ErrorKind::NoTextLayer,
            _ => ErrorKind::Empty,
        });
    }
    Ok(lines)
}

/// Decodes plain text: a BOM decides when present; otherwise valid UTF-8 is UTF-8, and anything
/// else must decode as GB18030 without a single error. Binary data is refused rather than turned
/// into replacement characters.
pub fn decode_text(bytes: &[u8]) -> Result<String, ErrorKind> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ErrorKind::Empty);
    }
    let text = if let Some((encoding, bom_len)) = encoding_rs::Encoding::for_bom(bytes) {
        encoding
            .decode_without_bom_handling_and_without_replacement(&bytes[bom_len..])
            .ok_or(ErrorKind::Binary("invalid bytes for its byte-order mark"))?
            .into_owned()
    } else if let Ok(s) = std::str::from_utf8(bytes) {
        s.to_string()
    } else {
        encoding_rs::GB18030
            .decode_without_bom_handling_and_without_replacement(bytes)
            .ok_or(ErrorKind::Binary("neither UTF-8 nor GB18030 text"))?
            .into_owned()
    };
    let controls = text
        .chars()
        .filter(|&c| c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\u{c}'))
        .count();
    if controls > 0 && controls * 100 >= text.chars().count().max(1) {
        return Err(ErrorKind::Binary(
            "control characters: this is not a text document",
        ));
    }
    if text.contains('\0') {
        return Err(ErrorKind::Binary("NUL bytes: this is not a text document"));
    }
    Ok(text)
}

/// Splits text into lines, reading Markdown heading markers.
pub fn text_lines(text: &str) -> Vec<Line> {
    text.lines()
        .map(|raw| {
            let trimmed = raw.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
            let hashes = trimmed.chars().take_while(|&c| c == '#').count();
            if (1..=6).contains(&hashes) && trimmed[hashes..].starts_with([' ', '\t', '\u{3000}']) {
                Line {
                    text: strip_emphasis(trimmed[hashes..].trim()),
                    heading: true,
                }
            } else {
                Line {
                    text: strip_emphasis(trimmed),
                    heading: false,
                }
            }
        })
        .collect()
}

/// Removes Markdown bold markers around a line (`**第三条** …`).
fn strip_emphasis(s: &str) -> String {
    if s.contains("**") {
        s.replace("**", "").trim().to_string()
    } else {
        s.to_string()
    }
}

/// Reads `word/document.xml` of a .docx: one line per paragraph, soft breaks as new lines,
/// tabs as spaces. Paragraphs styled Title or Heading* are headings.
pub fn docx_lines(bytes: &[u8]) -> Result<Vec<Line>, ErrorKind> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| ErrorKind::Corrupt(format!("not a valid .docx (zip archive): {e}")))?;
    let mut xml = String::new();
    archive
        .by_name("word/document.xml")
        .map_err(|e| ErrorKind::Corrupt(format!("not a valid .docx: word/document.xml: {e}")))?
        .read_to_string(&mut xml)
        .map_err(|e| ErrorKind::Corrupt(format!("not a valid .docx: word/document.xml: {e}")))?;

    let mut reader = Reader::from_str(&xml);
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut heading = false;
    let mut in_text = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| ErrorKind::Corrupt(format!("not a valid .docx: document.xml: {e}")))?;
        match event {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == "w:pStyle" => {
                for attr in e.attributes().flatten() {
                    if attr.key.as_ref() == "w:val" {
                        let style = attr.value.to_ascii_lowercase();
                        heading = style == "title" || style.starts_with("heading");
                    }
                }
            }
            Event::Start(e) if e.name().as_ref() == "w:t" => in_text = true,
            Event::End(e) if e.name().as_ref() == "w:t" => in_text = false,
            Event::Empty(e) if e.name().as_ref() == "w:tab" => current.push(' '),
            Event::Empty(e) if matches!(e.name().as_ref(), "w:br" | "w:cr") => {
                lines.push(Line {
                    text: std::mem::take(&mut current).trim().to_string(),
                    heading,
                });
            }
            Event::Text(t) if in_text => {
                current.push_str(&t.xml10_content());
            }
            Event::GeneralRef(r) if in_text => {
                // quick-xml reports entities (&amp; …) separately from the text around them.
                let resolved = match &*r {
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    _ => r.resolve_char_ref().ok().flatten(),
                };
                if let Some(c) = resolved {
                    current.push(c);
                }
            }
            Event::End(e) if e.name().as_ref() == "w:p" => {
                lines.push(Line {
                    text: std::mem::take(&mut current).trim().to_string(),
                    heading,
                });
                heading = false;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(lines)
}

/// Extracts the text layer of a PDF. A PDF of scanned pages has none, and is refused with a
/// message that says so. The PDF parser is guarded: a panic inside it is a corrupt file, not
/// a crash.
pub fn pdf_lines(bytes: &[u8]) -> Result<Vec<Line>, ErrorKind> {
    let owned = bytes.to_vec();
    let result = std::panic::catch_unwind(move || pdf_extract::extract_text_from_mem(&owned));
    let text = match result {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => return Err(ErrorKind::Corrupt(format!("not a readable PDF: {e}"))),
        Err(_) => {
            return Err(ErrorKind::Corrupt(
                "not a readable PDF (the parser failed)".into(),
            ));
        }
    };
    if text.trim().is_empty() {
        return Err(ErrorKind::NoTextLayer);
    }
    Ok(text_lines(&text)
        .into_iter()
        .map(|l| Line {
            text: l.text,
            heading: false,
        })
        .collect())
}
