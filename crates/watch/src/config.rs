//! `cameras.toml`: the cameras to watch, their zones and alert policies, checked as a whole
//! before anything starts. Every error names its line.
//!
//! ```toml
//! [defaults]                # optional; these are the defaults
//! interval = 2.0            # seconds between inspected frames, per camera
//! k = 2                     # an event when a rule is seen in k of the last m frames
//! m = 3
//! min_risk = "中"           # 高, 中 or 低
//! cooldown = 300            # seconds before the same rule raises another event
//!
//! [[camera]]
//! name = "crane-bay"
//! source = "rtsp://user:secret@10.0.0.5/stream1"
//! k = 3                     # any default can be set per camera
//!
//! [[camera.zone]]           # the helmet rule applies only in the crane bay
//! name = "crane bay"
//! polygon = [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]   # fractions of width and height
//! rules = ["《安全生产管理规定》第3条"]
//!
//! [[camera.ignore]]         # a poster of a worker
//! polygon = [[0.8, 0], [1, 0], [1, 0.3]]
//! ```

use std::{collections::BTreeMap, fmt};

use inspector_core::Risk;
use serde::Deserialize;
use toml::Spanned;

use crate::{Policy, Polygon, Zone, Zones};

/// One camera, ready to watch.
#[derive(Debug, Clone, PartialEq)]
pub struct Camera {
    pub name: String,
    /// As written (credentials included); log [`redact`]ed.
    pub source: String,
    pub interval_s: f64,
    pub policy: Policy,
    pub zones: Zones,
}

/// An error in the file, at a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Option<Settings>,
    #[serde(default)]
    camera: Vec<Spanned<CameraEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    interval: Option<Spanned<f64>>,
    k: Option<Spanned<i64>>,
    m: Option<Spanned<i64>>,
    min_risk: Option<Spanned<String>>,
    cooldown: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CameraEntry {
    name: Spanned<String>,
    source: Spanned<String>,
    // The [`Settings`] fields, written out: serde's `flatten` loses the spans.
    interval: Option<Spanned<f64>>,
    k: Option<Spanned<i64>>,
    m: Option<Spanned<i64>>,
    min_risk: Option<Spanned<String>>,
    cooldown: Option<Spanned<f64>>,
    #[serde(default)]
    zone: Vec<ZoneEntry>,
    #[serde(default)]
    ignore: Vec<IgnoreEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneEntry {
    name: Spanned<String>,
    polygon: Spanned<Vec<[f64; 2]>>,
    #[serde(default)]
    rules: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IgnoreEntry {
    polygon: Spanned<Vec<[f64; 2]>>,
}

/// The source schemes `inspector watch` reads; anything else must be a path.
const SCHEMES: [&str; 4] = ["rtsp://", "rtsps://", "http://", "https://"];

/// Parses and checks `text` (the contents of a cameras file). `known_rule` says whether a
/// canonical citation names a rule of the database. Returns every camera, or every error.
pub fn parse(
    text: &str,
    known_rule: impl Fn(&str) -> bool,
) -> Result<Vec<Camera>, Vec<ConfigError>> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: File = toml::from_str(text).map_err(|e| {
        vec![ConfigError {
            line: e.span().map_or(1, |s| line_of(s.start)),
            message: e.message().to_string(),
        }]
    })?;
    let mut errors = Vec::new();
    let mut err = |offset: usize, message: String| {
        errors.push(ConfigError {
            line: line_of(offset),
            message,
        })
    };
    let base = file.defaults.unwrap_or_default();
    let mut cameras = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    if file.camera.is_empty() {
        err(0, "no [[camera]] is defined".into());
    }
    for entry in &file.camera {
        let c = entry.get_ref();
        let name = c.name.get_ref().trim().to_string();
        if name.is_empty() {
            err(
                c.name.span().start,
                "a camera's name must not be empty".into(),
            );
        } else if let Some(first) = names.insert(name.clone(), line_of(c.name.span().start)) {
            err(
                c.name.span().start,
                format!("camera {name:?} is already defined on line {first}"),
            );
        }
        let source = c.source.get_ref();
        let lower = source.to_ascii_lowercase();
        if source.trim().is_empty() {
            err(
                c.source.span().start,
                format!("camera {name:?}: the source is empty"),
            );
        } else if lower.contains("://") && !SCHEMES.iter().any(|s| lower.starts_with(s)) {
            err(
                c.source.span().start,
                format!(
                    "camera {name:?}: unsupported source {}: expected rtsp://, rtsps://, \
                     http(s):// (an MJPEG stream or a snapshot URL), a video file or a folder",
                    redact(source)
                ),
            );
        }
        let mut policy = Policy::default();
        let mut interval_s = 2.0;
        if let Some(v) = pick(&c.interval, &base.interval) {
            if !(v.get_ref().is_finite() && *v.get_ref() > 0.0) {
                err(
                    v.span().start,
                    format!(
                        "interval must be a number of seconds > 0, not {}",
                        v.get_ref()
                    ),
                );
            }
            interval_s = *v.get_ref();
        }
        for (field, value, slot) in [
            ("k", pick(&c.k, &base.k), &mut policy.k),
            ("m", pick(&c.m, &base.m), &mut policy.m),
        ] {
            if let Some(v) = value {
                match usize::try_from(*v.get_ref()) {
                    Ok(n) if n > 0 => *slot = n,
                    _ => err(
                        v.span().start,
                        format!("{field} must be a whole number ≥ 1, not {}", v.get_ref()),
                    ),
                }
            }
        }
        let k_at = pick(&c.k, &base.k).map_or(entry.span().start, |v| v.span().start);
        if policy.k > policy.m {
            err(
                k_at,
                format!("k ({}) must not exceed m ({})", policy.k, policy.m),
            );
        }
        if let Some(v) = pick(&c.min_risk, &base.min_risk) {
            match Risk::parse(v.get_ref()) {
                Some(r) => policy.min_risk = r,
                None => err(
                    v.span().start,
                    format!("min_risk {:?} is not 高, 中 or 低", v.get_ref()),
                ),
            }
        }
        if let Some(v) = pick(&c.cooldown, &base.cooldown) {
            if !(v.get_ref().is_finite() && *v.get_ref() >= 0.0) {
                err(
                    v.span().start,
                    format!(
                        "cooldown must be a number of seconds ≥ 0, not {}",
                        v.get_ref()
                    ),
                );
            }
            policy.cooldown_s = *v.get_ref();
        }
        let mut zones = Zones::default();
        for z in &c.zone {
            let polygon = Polygon(z.polygon.get_ref().clone());
            if let Err(e) = polygon.validate() {
                err(
                    z.polygon.span().start,
                    format!("zone {:?}: {e}", z.name.get_ref()),
                );
            }
            let mut rules = Vec::new();
            for r in &z.rules {
                if known_rule(r.get_ref()) {
                    rules.push(r.get_ref().clone());
                } else {
                    err(
                        r.span().start,
                        format!(
                            "zone {:?}: unknown rule {:?}: cite it as `inspector rules list` \
                             shows it",
                            z.name.get_ref(),
                            r.get_ref()
                        ),
                    );
                }
            }
            zones.zones.push(Zone {
                name: z.name.get_ref().clone(),
                polygon,
                rules,
            });
        }
        for i in &c.ignore {
            let polygon = Polygon(i.polygon.get_ref().clone());
            if let Err(e) = polygon.validate() {
                err(i.polygon.span().start, format!("ignored region: {e}"));
            }
            zones.ignore.push(polygon);
        }
        cameras.push(Camera {
            name,
            source: source.clone(),
            interval_s,
            policy,
            zones,
        });
    }
    if errors.is_empty() {
        Ok(cameras)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(errors)
    }
}

/// A camera's own setting, else the `[defaults]` one.
fn pick<'a, T>(
    own: &'a Option<Spanned<T>>,
    default: &'a Option<Spanned<T>>,
) -> Option<&'a Spanned<T>> {
    own.as_ref().or(default.as_ref())
}

/// `source` with any password (and user) in a URL replaced by `***`, for logs and events.
pub fn redact(source: &str) -> String {
    let Some(scheme_end) = source.find("://") else {
        return source.to_string();
    };
    let rest = &source[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***@{}", &source[..scheme_end + 3], &rest[at + 1..]),
        None => source.to_string(),
    }
}
