//! Constrained decoding to a JSON Schema: OpenAI's `response_format: {"type": "json_schema"}`.
//!
//! [`SchemaGrammar::compile`] takes a schema from a stated subset and answers, for any byte
//! string, whether it is a whole instance, a prefix of one (and how many bytes at least are still
//! needed to close it), or neither. A decoder that only emits tokens keeping its text a prefix,
//! and only while the bytes still needed fit in the tokens left, always ends with a valid instance
//! within its token budget (byte-level BPE vocabularies hold a token for every byte).
//!
//! The subset: the root is an object. An object has `properties`, generated in the schema's
//! order, `required` (names among its properties) and `additionalProperties` (`false` or
//! absent). A value is a `string` (with `maxLength` in characters, or an `enum` of strings), an
//! `integer`, a `number`, a `boolean`, an object of the same kind, or an `array` of any of these
//! with `maxItems`. `title`, `description`, `$schema`, `$comment`, `$id`, `default` and
//! `examples` are annotations and are ignored. Anything else is refused by
//! [`SchemaError::keyword`], never ignored: a schema the grammar cannot honour must not be
//! silently weakened.
//!
//! The output is single-line JSON: no whitespace, except at most one space after `:` and `,`
//! (the separators of Python's `json.dumps`, which most fine-tuning data is written with, so a
//! model keeps the layout it learned). Strings take JSON's escapes; integers have at most 15
//! digits, fractions 15 and exponents 2 (so every number is finite as a double).
//!
//! ```
//! use inspector_core::json_schema::{Json, SchemaGrammar};
//! use inspector_core::grammar::Viability;
//!
//! let schema: Json = serde_json::from_str(r#"{"type": "object",
//!     "properties": {"risk": {"type": "string", "enum": ["高", "低"]},
//!                    "count": {"type": "integer"}},
//!     "required": ["risk"], "additionalProperties": false}"#).unwrap();
//! let g = SchemaGrammar::compile(&schema).unwrap();
//! assert_eq!(g.check(r#"{"risk": "高""#.as_bytes()), Viability::Prefix);
//! assert_eq!(g.remaining(r#"{"risk": "高""#.as_bytes()), Some(1)); // just `}`
//! assert_eq!(g.check(r#"{"risk":"低","count":3}"#.as_bytes()), Viability::Complete);
//! assert_eq!(g.check(r#"{"count": 3"#.as_bytes()), Viability::Invalid); // out of order
//! let bad: Json = serde_json::from_str(r#"{"type": "object", "patternProperties": {}}"#).unwrap();
//! assert_eq!(SchemaGrammar::compile(&bad).unwrap_err().keyword, "patternProperties");
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::grammar::Viability;

/// A JSON value that keeps its objects' keys in the order written (the grammar generates
/// properties in schema order; `serde_json::Value` sorts them).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The value of `key` in an object (the first, should it repeat).
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    /// An object from `(key, value)` pairs, in that order.
    pub fn object<K: Into<String>>(entries: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Object(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A string value.
    pub fn str(s: impl Into<String>) -> Json {
        Json::String(s.into())
    }

    /// Compact JSON text, keys in order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Json value always serialises")
    }
}

impl From<&serde_json::Value> for Json {
    /// Keys come in `serde_json`'s order (sorted unless its `preserve_order` feature is on).
    fn from(v: &serde_json::Value) -> Json {
        use serde_json::Value;
        match v {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Number(n.clone()),
            Value::String(s) => Json::String(s.clone()),
            Value::Array(a) => Json::Array(a.iter().map(Json::from).collect()),
            Value::Object(o) => {
                Json::Object(o.iter().map(|(k, v)| (k.clone(), v.into())).collect())
            }
        }
    }
}

impl Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Json;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Json, E> {
                serde_json::Number::from_f64(n)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("a number that is not finite"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::String(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::String(s))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    entries.push((k, v));
                }
                Ok(Json::Object(entries))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Why a schema is outside the subset: the keyword, where it is (a JSON pointer) and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub keyword: String,
    pub path: String,
    pub message: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "`{}` at {}: {}", self.keyword, self.path, self.message)
    }
}

impl std::error::Error for SchemaError {}

/// Keywords that describe and never constrain.
const ANNOTATIONS: [&str; 7] = [
    "title",
    "description",
    "$schema",
    "$comment",
    "$id",
    "default",
    "examples",
];

/// Schemas nest at most this deep.
pub const MAX_DEPTH: usize = 16;
const MAX_INT_DIGITS: usize = 15;
const MAX_FRACTION_DIGITS: usize = 15;
const MAX_EXPONENT_DIGITS: usize = 2;

#[derive(Debug, Clone)]
enum Node {
    Object(Vec<Prop>),
    /// Free text of at most `max` characters.
    Text(Option<usize>),
    /// One of these strings, JSON-encoded with their quotes.
    Choice(Vec<Vec<u8>>),
    Integer,
    Number,
    Boolean,
    Array(Box<Node>, Option<usize>),
}

#[derive(Debug, Clone)]
struct Prop {
    /// `"name":` as JSON.
    key: Vec<u8>,
    required: bool,
    node: Node,
}

/// A compiled schema.
#[derive(Debug, Clone)]
pub struct SchemaGrammar {
    root: Node,
}

/// A parse of a prefix: consumed up to an index, ran out of input needing at least this many
/// more bytes to close everything open, or failed.
enum P {
    Done(usize),
    More(usize),
    Bad,
}

use P::{Bad, Done, More};

macro_rules! step {
    ($e:expr, $rest:expr) => {
        match $e {
            Done(i) => i,
            More(n) => return More(n + $rest),
            Bad => return Bad,
        }
    };
}

fn lit(s: &[u8], i: usize, l: &[u8]) -> P {
    let rest = &s[i.min(s.len())..];
    if rest.len() >= l.len() {
        if &rest[..l.len()] == l {
            Done(i + l.len())
        } else {
            Bad
        }
    } else if l.starts_with(rest) {
        More(l.len() - rest.len())
    } else {
        Bad
    }
}

/// At most one space (after `:` and `,`).
fn ws(s: &[u8], i: usize) -> usize {
    if s.get(i) == Some(&b' ') { i + 1 } else { i }
}

/// One of `choices` (literal bytes; none is a proper prefix of another that is also complete
/// here, since they end in a quote or are `true`/`false`).
fn choice<T: AsRef<[u8]>>(s: &[u8], i: usize, choices: &[T]) -> P {
    let rest = &s[i.min(s.len())..];
    let mut need = None::<usize>;
    for c in choices {
        let c = c.as_ref();
        if rest.len() >= c.len() {
            if rest.starts_with(c) {
                return Done(i + c.len());
            }
        } else if c.starts_with(rest) {
            let n = c.len() - rest.len();
            need = Some(need.map_or(n, |m| m.min(n)));
        }
    }
    need.map_or(Bad, More)
}

/// A JSON string of at most `max` characters.
fn text(s: &[u8], i: usize, max: Option<usize>) -> P {
    let mut i = step!(lit(s, i, b"\""), 1);
    let mut chars = 0usize;
    loop {
        let Some(&c) = s.get(i) else { return More(1) };
        if c == b'"' {
            return Done(i + 1);
        }
        if max.is_some_and(|m| chars >= m) || c < 0x20 {
            return Bad;
        }
        chars += 1;
        if c == b'\\' {
            match s.get(i + 1) {
                None => return More(2),
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                Some(b'u') => {
                    let hex = &s[(i + 2).min(s.len())..(i + 6).min(s.len())];
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Bad;
                    }
                    if hex.len() < 4 {
                        return More(4 - hex.len() + 1);
                    }
                    // Lone surrogates are not characters.
                    let v = u32::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
                    if (0xD800..0xE000).contains(&v) {
                        return Bad;
                    }
                    i += 6;
                }
                Some(_) => return Bad,
            }
        } else if c < 0x80 {
            i += 1;
        } else {
            let n = match c {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF4 => 4,
                _ => return Bad,
            };
            let have = &s[i..(i + n).min(s.len())];
            if have.len() < n {
                // A character cut by the end of the input: its start must still be valid.
                return match std::str::from_utf8(have) {
                    Err(e) if e.error_len().is_none() => More(n - have.len() + 1),
                    _ => Bad,
                };
            }
            if std::str::from_utf8(have).is_err() {
                return Bad;
            }
            i += n;
        }
    }
}

/// A JSON number: an integer, or with `fraction` also a fraction and exponent. At the end of the
/// input, a number that is already whole needs nothing more (it may still grow).
fn number(s: &[u8], i: usize, fraction: bool) -> P {
    let digits = |j: usize| {
        s[j.min(s.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let mut j = i;
    if s.get(j) == Some(&b'-') {
        j += 1;
    }
    match s.get(j) {
        None => return More(1),
        Some(b'0') => j += 1,
        Some(b'1'..=b'9') => {
            let n = digits(j);
            if n > MAX_INT_DIGITS {
                return Bad;
            }
            j += n;
        }
        Some(_) => return Bad,
    }
    if !fraction {
        return if j == s.len() { More(0) } else { Done(j) };
    }
    if s.get(j) == Some(&b'.') {
        j += 1;
        let n = digits(j);
        if n > MAX_FRACTION_DIGITS {
            return Bad;
        }
        if n == 0 {
            return if j == s.len() { More(1) } else { Bad };
        }
        j += n;
    }
    if matches!(s.get(j), Some(b'e' | b'E')) {
        j += 1;
        if matches!(s.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let n = digits(j);
        if n > MAX_EXPONENT_DIGITS {
            return Bad;
        }
        if n == 0 {
            return if j == s.len() { More(1) } else { Bad };
        }
        j += n;
    }
    if j == s.len() { More(0) } else { Done(j) }
}

impl Node {
    /// The fewest bytes of an instance.
    fn min_len(&self) -> usize {
        match self {
            Node::Object(props) => 1 + close_len(props, 0, false),
            Node::Text(_) => 2,
            Node::Choice(c) => c.iter().map(Vec::len).min().unwrap_or(0),
            Node::Integer | Node::Number => 1,
            Node::Boolean => 4,
            Node::Array(..) => 2,
        }
    }

    fn parse(&self, s: &[u8], i: usize) -> P {
        if i >= s.len() {
            return More(self.min_len());
        }
        match self {
            Node::Object(props) => object(props, s, i),
            Node::Text(max) => text(s, i, *max),
            Node::Choice(c) => choice(s, i, c),
            Node::Integer => number(s, i, false),
            Node::Number => number(s, i, true),
            Node::Boolean => choice(s, i, &[b"true".as_slice(), b"false"]),
            Node::Array(items, max) => array(items, *max, s, i),
        }
    }
}

/// The fewest bytes that close an object whose properties before `next` are decided (`any`:
/// whether one was written): the required ones still to come, then `}`.
fn close_len(props: &[Prop], next: usize, any: bool) -> usize {
    let mut n = 1;
    let mut any = any;
    for p in props[next.min(props.len())..].iter().filter(|p| p.required) {
        n += usize::from(any) + p.key.len() + p.node.min_len();
        any = true;
    }
    n
}

fn object(props: &[Prop], s: &[u8], i: usize) -> P {
    let mut i = step!(lit(s, i, b"{"), close_len(props, 0, false));
    let mut next = 0;
    let mut any = false;
    loop {
        if i >= s.len() {
            return More(close_len(props, next, any));
        }
        if s[i] == b'}' {
            return if props[next..].iter().any(|p| p.required) {
                Bad
            } else {
                Done(i + 1)
            };
        }
        if any {
            i = step!(lit(s, i, b","), 0);
            i = ws(s, i);
        }
        // The next property: any from `next` up to and including the first required one.
        let last = props[next..]
            .iter()
            .position(|p| p.required)
            .map_or(props.len(), |k| next + k + 1);
        let rest = &s[i.min(s.len())..];
        let mut chosen = None;
        let mut need = None::<usize>;
        for (k, p) in props.iter().enumerate().take(last).skip(next) {
            if rest.len() >= p.key.len() {
                if rest.starts_with(&p.key) {
                    chosen = Some(k);
                    break;
                }
            } else if p.key.starts_with(rest) {
                let n = p.key.len() - rest.len() + p.node.min_len() + close_len(props, k + 1, true);
                need = Some(need.map_or(n, |m| m.min(n)));
            }
        }
        let Some(k) = chosen else {
            return need.map_or(Bad, More);
        };
        i = ws(s, i + props[k].key.len());
        i = step!(props[k].node.parse(s, i), close_len(props, k + 1, true));
        next = k + 1;
        any = true;
    }
}

fn array(items: &Node, max: Option<usize>, s: &[u8], i: usize) -> P {
    let mut i = step!(lit(s, i, b"["), 1);
    if i >= s.len() {
        return More(1);
    }
    if s[i] == b']' {
        return Done(i + 1);
    }
    if max == Some(0) {
        return Bad;
    }
    let mut count = 0;
    loop {
        i = step!(items.parse(s, i), 1);
        count += 1;
        if i >= s.len() {
            return More(1);
        }
        if s[i] == b']' {
            return Done(i + 1);
        }
        if max.is_some_and(|m| count >= m) {
            return Bad;
        }
        i = step!(lit(s, i, b","), items.min_len() + 1);
        i = ws(s, i);
    }
}

fn error(keyword: &str, path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        keyword: keyword.into(),
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        message: message.into(),
    }
}

/// JSON pointer escaping of one segment.
fn pointer(path: &str, segment: &str) -> String {
    format!("{path}/{}", segment.replace('~', "~0").replace('/', "~1"))
}

fn count(v: &Json, keyword: &str, path: &str) -> Result<usize, SchemaError> {
    match v {
        Json::Number(n) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| error(keyword, path, "must be a non-negative integer")),
        _ => Err(error(keyword, path, "must be a non-negative integer")),
    }
}

fn compile(v: &Json, path: &str, depth: usize) -> Result<Node, SchemaError> {
    if depth > MAX_DEPTH {
        return Err(error(
            "properties",
            path,
            format!("schemas nest at most {MAX_DEPTH} deep"),
        ));
    }
    let Json::Object(entries) = v else {
        return Err(error(
            "schema",
            path,
            "a schema must be an object (boolean schemas are not supported)",
        ));
    };
    for (i, (k, _)) in entries.iter().enumerate() {
        if entries[..i].iter().any(|(other, _)| other == k) {
            return Err(error(k, path, "the keyword is given twice"));
        }
    }
    let has_enum = v.get("enum").is_some();
    let ty = match v.get("type") {
        Some(Json::String(t)) => t.as_str(),
        Some(_) => {
            return Err(error(
                "type",
                &pointer(path, "type"),
                "only a single type name is supported (no type lists or null)",
            ));
        }
        None if has_enum => "string",
        None => return Err(error("type", path, "every schema needs a `type`")),
    };
    let allowed: &[&str] = match ty {
        "object" => &["type", "properties", "required", "additionalProperties"],
        "string" => &["type", "maxLength", "enum"],
        "integer" | "number" | "boolean" => &["type"],
        "array" => &["type", "items", "maxItems"],
        other => {
            return Err(error(
                "type",
                &pointer(path, "type"),
                format!(
                    "`{other}` is not supported: use object, string, integer, number, boolean or array"
                ),
            ));
        }
    };
    if let Some((k, _)) = entries
        .iter()
        .find(|(k, _)| !allowed.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
    {
        return Err(error(
            k,
            &pointer(path, k),
            format!(
                "not supported for type `{ty}` (supported: {})",
                allowed.join(", ")
            ),
        ));
    }
    Ok(match ty {
        "object" => {
            let here = pointer(path, "properties");
            let props = match v.get("properties") {
                Some(Json::Object(p)) => p.as_slice(),
                Some(_) => return Err(error("properties", &here, "must be an object")),
                None => &[],
            };
            let required: Vec<&str> = match v.get("required") {
                None => Vec::new(),
                Some(Json::Array(names)) => names
                    .iter()
                    .map(|n| {
                        n.as_str()
                            .filter(|n| props.iter().any(|(k, _)| k == n))
                            .ok_or_else(|| {
                                error(
                                    "required",
                                    &pointer(path, "required"),
                                    format!("{} is not one of the properties", n.to_json()),
                                )
                            })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(error(
                        "required",
                        &pointer(path, "required"),
                        "must be a list of names",
                    ));
                }
            };
            match v.get("additionalProperties") {
                None | Some(Json::Bool(false)) => {}
                Some(_) => {
                    return Err(error(
                        "additionalProperties",
                        &pointer(path, "additionalProperties"),
                        "only `false` is supported (properties are generated from the schema)",
                    ));
                }
            }
            let mut out = Vec::with_capacity(props.len());
            for (name, schema) in props {
                let mut key = serde_json::to_vec(name).expect("a string serialises");
                key.push(b':');
                out.push(Prop {
                    key,
                    required: required.contains(&name.as_str()),
                    node: compile(schema, &pointer(&here, name), depth + 1)?,
                });
            }
            Node::Object(out)
        }
        "string" => match v.get("enum") {
            Some(Json::Array(values)) if !values.is_empty() => {
                if v.get("maxLength").is_some() {
                    return Err(error(
                        "maxLength",
                        &pointer(path, "maxLength"),
                        "give `enum` or `maxLength`, not both",
                    ));
                }
                let mut choices = Vec::with_capacity(values.len());
                for value in values {
                    let Json::String(text) = value else {
                        return Err(error(
                            "enum",
                            &pointer(path, "enum"),
                            "only strings are supported in an enum",
                        ));
                    };
                    choices.push(serde_json::to_vec(text).expect("a string serialises"));
                }
                Node::Choice(choices)
            }
            Some(_) => {
                return Err(error(
                    "enum",
                    &pointer(path, "enum"),
                    "must be a non-empty list of strings",
                ));
            }
            None => Node::Text(
                v.get("maxLength")
                    .map(|m| count(m, "maxLength", &pointer(path, "maxLength")))
                    .transpose()?,
            ),
        },
        "integer" => Node::Integer,
        "number" => Node::Number,
        "boolean" => Node::Boolean,
        "array" => {
            let items = v
                .get("items")
                .ok_or_else(|| error("items", path, "an array needs `items`"))?;
            let node = compile(items, &pointer(path, "items"), depth + 1)?;
            let max = v
                .get("maxItems")
                .map(|m| count(m, "maxItems", &pointer(path, "maxItems")))
                .transpose()?;
            Node::Array(Box::new(node), max)
        }
        _ => unreachable!("checked above"),
    })
}

impl SchemaGrammar {
    /// Compiles `schema`, or names the first keyword outside the subset.
    pub fn compile(schema: &Json) -> Result<SchemaGrammar, SchemaError> {
        let root = compile(schema, "", 0)?;
        if !matches!(root, Node::Object(_)) {
            return Err(error("type", "/type", "the root must be an object"));
        }
        Ok(SchemaGrammar { root })
    }

    /// The fewest bytes of an instance.
    pub fn min_len(&self) -> usize {
        self.root.min_len()
    }

    /// Whether `s` is a whole instance, a prefix of one, or neither.
    pub fn check(&self, s: &[u8]) -> Viability {
        match self.remaining(s) {
            Some(0) => Viability::Complete,
            Some(_) => Viability::Prefix,
            None => Viability::Invalid,
        }
    }

    /// The fewest bytes that complete `s` into an instance (0: it is one), or `None` when no
    /// continuation makes it one.
    pub fn remaining(&self, s: &[u8]) -> Option<usize> {
        match self.root.parse(s, 0) {
            Done(i) if i == s.len() => Some(0),
            Done(_) | Bad => None,
            More(n) => Some(n.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Json {
        serde_json::from_str(text).unwrap()
    }

    fn grammar(text: &str) -> SchemaGrammar {
        SchemaGrammar::compile(&schema(text)).unwrap()
    }

    const ANSWER: &str = r#"{"type": "object", "properties": {
        "status": {"type": "string", "enum": ["safe", "violation"]},
        "violations": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
            "description": {"type": "string", "maxLength": 20},
            "rule": {"type": "string", "enum": ["《安全作业规程》第3.1条", "《电气安全规程》第12条"]},
            "risk": {"type": "string", "enum": ["高", "中", "低"]},
            "suggestion": {"type": "string"},
            "box": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}},
            "required": ["description", "rule", "risk"], "additionalProperties": false}},
        "score": {"type": "number"},
        "checked": {"type": "boolean"}},
        "required": ["status", "violations"], "additionalProperties": false}"#;

    const INSTANCE: &str = r#"{"status": "violation", "violations": [{"description": "未戴\"帽\"\u4e2a","rule":"《电气安全规程》第12条", "risk": "高", "box": [1, -20, 300, 0]}, {"description": "", "rule": "《安全作业规程》第3.1条", "risk": "低", "suggestion": "x"}], "score": -1.5e+3, "checked": false}"#;

    #[test]
    fn every_prefix_is_viable_the_whole_complete_and_the_need_shrinks_to_zero() {
        let g = grammar(ANSWER);
        let bytes = INSTANCE.as_bytes();
        assert!(serde_json::from_str::<serde_json::Value>(INSTANCE).is_ok());
        for n in 0..bytes.len() {
            let need = g.remaining(&bytes[..n]);
            assert!(
                need.is_some_and(|k| k >= 1),
                "prefix {:?}: {need:?}",
                String::from_utf8_lossy(&bytes[..n])
            );
        }
        assert_eq!(g.check(bytes), Viability::Complete);
        assert_eq!(g.remaining(b""), Some(g.min_len()));
        assert_eq!(g.min_len(), r#"{"status":"safe","violations":[]}"#.len());
        assert_eq!(
            g.check(br#"{"status":"safe","violations":[]}"#),
            Viability::Complete
        );
    }

    #[test]
    fn the_need_is_exactly_the_shortest_completion() {
        let g = grammar(ANSWER);
        for (prefix, shortest) in [
            (r#"{"#, r#""status":"safe","violations":[]}"#),
            (r#"{"status": "v"#, r#"iolation","violations":[]}"#),
            (
                r#"{"status":"safe","violations":[{"des"#,
                r#"cription":"","rule":"《电气安全规程》第12条","risk":"高"}]}"#,
            ),
            (
                r#"{"status":"safe","violations":[{"description":"a","rule":"《电"#,
                r#"气安全规程》第12条","risk":"高"}]}"#,
            ),
            (r#"{"status":"safe","violations":[], "score": 1."#, r#"0}"#),
            (r#"{"status":"safe","violations":[], "score": 12"#, r#"}"#),
            (
                r#"{"status":"safe","violations":[], "ch"#,
                r#"ecked":true}"#,
            ),
            (
                r#"{"status":"safe","violations":[{"description":"a\u00"#,
                r#"00","rule":"《电气安全规程》第12条","risk":"高"}]}"#,
            ),
        ] {
            let whole = format!("{prefix}{shortest}");
            assert_eq!(g.check(whole.as_bytes()), Viability::Complete, "{whole}");
            assert_eq!(
                g.remaining(prefix.as_bytes()),
                Some(shortest.len()),
                "{prefix}"
            );
        }
        // Inside a character cut by a byte-level token.
        let cut = "{\"status\":\"safe\",\"violations\":[{\"description\":\"作".as_bytes();
        assert_eq!(g.check(&cut[..cut.len() - 1]), Viability::Prefix);
    }

    #[test]
    fn what_breaks_the_schema_is_invalid_as_soon_as_it_appears() {
        let g = grammar(ANSWER);
        for bad in [
            r#" {"#,
            r#"{"violations"#,
            r#"{"status": "unsafe"#,
            r#"{"status":"safe","violations":[],"status"#,
            r#"{"status":"safe","violations":[],"extra"#,
            r#"{"status":"safe"}"#,
            r#"{"status":"safe",  "#,
            r#"{"status":"safe","violations":[{"description":"123456789012345678901"#,
            r#"{"status":"safe","violations":[{"description":"a\q"#,
            r#"{"status":"safe","violations":[{"description":"a\ud800"#,
            "{\"status\":\"safe\",\"violations\":[{\"description\":\"a\n",
            r#"{"status":"safe","violations":[{"description":"a","rule":"《安全作业规程》第9"#,
            r#"{"status":"safe","violations":[{"description":"a","rule":"《电气安全规程》第12条","risk":"高","box":[01"#,
            r#"{"status":"safe","violations":[{"description":"a","rule":"《电气安全规程》第12条","risk":"高","box":[1,2,3,4,"#,
            r#"{"status":"safe","violations":[{"description":"a","rule":"《电气安全规程》第12条","risk":"高","box":[1.5"#,
            r#"{"status":"safe","violations":[{"description":"a","rule":"《电气安全规程》第12条","risk":"高","box":[1234567890123456"#,
            r#"{"status":"safe","violations":[],"score":1.}"#,
            r#"{"status":"safe","violations":[],"score":+1"#,
            r#"{"status":"safe","violations":[],"checked":tru}"#,
            r#"{"status":"safe","violations":[]}}"#,
            r#"{"status":"safe","violations":[]} "#,
        ] {
            assert_eq!(g.check(bad.as_bytes()), Viability::Invalid, "{bad}");
        }
        // maxItems 3.
        let v = r#"{"description":"a","rule":"《电气安全规程》第12条","risk":"高"}"#;
        let three = format!(r#"{{"status":"violation","violations":[{v},{v},{v}"#);
        assert_eq!(
            g.check(format!("{three}]}}").as_bytes()),
            Viability::Complete
        );
        assert_eq!(g.check(format!("{three},").as_bytes()), Viability::Invalid);
        // Invalid UTF-8 in a string.
        let mut b = br#"{"status":"safe","violations":[{"description":""#.to_vec();
        b.extend_from_slice(&[0xE4, 0x41]);
        assert_eq!(g.check(&b), Viability::Invalid);
    }

    #[test]
    fn properties_come_in_schema_order_and_optional_ones_may_be_skipped() {
        let g = grammar(
            r#"{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"integer"},"c":{"type":"integer"}},"required":["c"]}"#,
        );
        for ok in [
            r#"{"c":1}"#,
            r#"{"b":1,"c":2}"#,
            r#"{"a":1,"c":2}"#,
            r#"{"b":1, "a":2, "c":3}"#,
        ] {
            assert_eq!(g.check(ok.as_bytes()), Viability::Complete, "{ok}");
        }
        for bad in [
            r#"{"a":1,"b"#,
            r#"{"c":1,"a"#,
            r#"{}"#,
            r#"{"b":1}"#,
            r#"{"b":1,"b"#,
        ] {
            assert_eq!(g.check(bad.as_bytes()), Viability::Invalid, "{bad}");
        }
        // Nothing required: `{}` is whole.
        let g = grammar(r#"{"type":"object","properties":{"x":{"type":"boolean"}}}"#);
        assert_eq!(g.check(b"{}"), Viability::Complete);
        assert_eq!(g.min_len(), 2);
    }

    #[test]
    fn keywords_outside_the_subset_are_named() {
        for (text, keyword, path) in [
            (
                r#"{"type":"object","properties":{"a":{"type":"string","pattern":"x"}}}"#,
                "pattern",
                "/properties/a/pattern",
            ),
            (
                r#"{"type":"object","properties":{"a":{"type":["string","null"]}}}"#,
                "type",
                "/properties/a/type",
            ),
            (
                r##"{"type":"object","properties":{"a":{"$ref":"#/$defs/x"}}}"##,
                "type",
                "/properties/a",
            ),
            (
                r##"{"type":"object","properties":{"a":{"type":"string","$ref":"#/$defs/x"}}}"##,
                "$ref",
                "/properties/a/$ref",
            ),
            (r#"{"type":"object","$defs":{}}"#, "$defs", "/$defs"),
            (
                r#"{"type":"object","additionalProperties":true}"#,
                "additionalProperties",
                "/additionalProperties",
            ),
            (
                r#"{"type":"object","required":["nope"]}"#,
                "required",
                "/required",
            ),
            (
                r#"{"type":"array","items":{"type":"string"}}"#,
                "type",
                "/type",
            ),
            (
                r#"{"type":"object","properties":{"n":{"type":"integer","minimum":0}}}"#,
                "minimum",
                "/properties/n/minimum",
            ),
            (
                r#"{"type":"object","properties":{"l":{"type":"array","items":{"type":"null"}}}}"#,
                "type",
                "/properties/l/items/type",
            ),
            (
                r#"{"type":"object","properties":{"l":{"type":"array","items":{"type":"string"},"minItems":1}}}"#,
                "minItems",
                "/properties/l/minItems",
            ),
            (
                r#"{"type":"object","properties":{"e":{"enum":[1,2]}}}"#,
                "enum",
                "/properties/e/enum",
            ),
            (
                r#"{"type":"object","properties":{"s":{"type":"string","maxLength":-1}}}"#,
                "maxLength",
                "/properties/s/maxLength",
            ),
            (
                r#"{"type":"object","properties":{"a/b":{"type":"string","format":"date"}}}"#,
                "format",
                "/properties/a~1b/format",
            ),
            (r#"{"type":"object","anyOf":[]}"#, "anyOf", "/anyOf"),
            (r#"true"#, "schema", "/"),
        ] {
            let e = SchemaGrammar::compile(&schema(text)).unwrap_err();
            assert_eq!(
                (e.keyword.as_str(), e.path.as_str()),
                (keyword, path),
                "{text}: {e}"
            );
        }
        // Annotations are fine.
        grammar(
            r#"{"type":"object","title":"t","description":"d","$schema":"x","properties":{"a":{"type":"string","description":"d","default":"x"}}}"#,
        );
    }

    #[test]
    fn json_keeps_the_order_written_both_ways() {
        let text = r#"{"z":1,"a":[true,null,"x",{"m":2.5,"b":-3}]}"#;
        let v: Json = serde_json::from_str(text).unwrap();
        assert_eq!(v.to_json(), text);
    }

    /// A decoder over a byte-level vocabulary (every byte, plus longer pieces) that picks allowed
    /// tokens at random, only while the bytes still needed fit in the tokens left, always ends
    /// with a valid instance within its budget.
    #[test]
    fn random_constrained_decoding_always_closes_within_the_budget() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let g = grammar(ANSWER);
        let mut vocab: Vec<Vec<u8>> = (0u8..=255).map(|b| vec![b]).collect();
        for piece in [
            "{\"",
            "\":",
            "\": \"",
            "\", \"",
            "status",
            "violation",
            "violations",
            "safe",
            "[{",
            "}]",
            "description",
            "rule",
            "risk",
            "《安全作业规程》",
            "第3.1条",
            "第12条",
            "高",
            "中",
            "低",
            "suggestion",
            "box",
            "1000",
            "12",
            "true",
            "false",
            "score",
            "checked",
            "作业",
            "安全帽",
            "\\u4e2a",
            "\\n",
            ", ",
            "e+",
            ".5",
        ] {
            vocab.push(piece.as_bytes().to_vec());
        }
        let mut rng = StdRng::seed_from_u64(7);
        for budget in [g.min_len(), g.min_len() + 1, 40, 60, 90, 200] {
            for _ in 0..30 {
                let mut text = Vec::new();
                let mut tokens = 0;
                while g.check(&text) != Viability::Complete {
                    assert!(tokens < budget, "over budget {budget}");
                    let left = budget - tokens - 1;
                    let allowed: Vec<&Vec<u8>> = vocab
                        .iter()
                        .filter(|p| {
                            let mut t = text.clone();
                            t.extend_from_slice(p);
                            g.remaining(&t).is_some_and(|n| n <= left)
                        })
                        .collect();
                    assert!(
                        !allowed.is_empty(),
                        "stuck at {:?}",
                        String::from_utf8_lossy(&text)
                    );
                    text.extend_from_slice(allowed[rng.random_range(0..allowed.len())]);
                    tokens += 1;
                }
                let s = std::str::from_utf8(&text).unwrap();
                let v: serde_json::Value = serde_json::from_str(s).unwrap();
                assert!(v["status"].is_string() && v["violations"].is_array(), "{s}");
                for item in v["violations"].as_array().unwrap() {
                    assert!(
                        item["description"].as_str().unwrap().chars().count() <= 20,
                        "{s}"
                    );
                    assert!(item["risk"].is_string() && item["rule"].is_string(), "{s}");
                }
            }
        }
    }
}
