//! The example regulations shipped inside the binary, so that a fresh database has rules to
//! cite before the user loads their own.

use inspector_rules::{Categorizer, Document, extract_bytes};

/// (file name, bytes) of each bundled example regulation.
pub const EXAMPLES: [(&str, &[u8]); 3] = [
    (
        "examples/regulations/safety-operation.md",
        include_bytes!("../../../examples/regulations/safety-operation.md"),
    ),
    (
        "examples/regulations/site-management.txt",
        include_bytes!("../../../examples/regulations/site-management.txt"),
    ),
    (
        "examples/regulations/electrical-safety.docx",
        include_bytes!("../../../examples/regulations/electrical-safety.docx"),
    ),
];

/// Extracts the bundled examples.
pub fn documents(categorizer: &Categorizer) -> anyhow::Result<Vec<Document>> {
    EXAMPLES
        .iter()
        .map(|(name, bytes)| Ok(extract_bytes(name, bytes, categorizer)?))
        .collect()
}
