//! Camera alerting: a camera's findings, frame after frame, into alert events.
//!
//! A safety officer wants to be told when a hazard is really there, once, not on every frame
//! and not on one bad frame. For each camera, [`Alerter`] does what commercial EHS camera
//! products do:
//! - **zones** ([`Zones`]): polygons where chosen rules apply (a rule that no zone names
//!   applies everywhere), and regions to ignore (a violation whose box centre lies in one is
//!   dropped); coordinates are fractions of the frame's width and height, so a zone survives
//!   a change of stream resolution;
//! - a **risk threshold**: violations below it are not alerted on;
//! - **debouncing**: a rule becomes an event when it is seen in `k` of the camera's last `m`
//!   frames;
//! - a **cooldown** per camera and rule: no second event for the same rule until it has passed.
//!
//! Defaults ([`Policy::default`]): k = 2, m = 3, threshold 中 (medium), cooldown 300 s. Times are
//! seconds on the source's own clock (media time for a file, the epoch for a live camera), so a
//! file decoded faster than real time debounces as it would have live. A frame that the change
//! gate skips repeats the last result: pass the last frame's violations again.
//!
//! ```
//! use inspector_core::Risk;
//! use inspector_watch::{Alerter, Policy, Seen, Zones};
//!
//! let mut camera = Alerter::new(Policy::default(), Zones::default());
//! let helmet = Seen { rule: "《安全生产管理规定》第3条".into(), risk: Risk::High, bbox: None };
//! assert!(camera.observe(0.0, (1920, 1080), &[helmet.clone()]).is_empty()); // 1 of 3
//! let events = camera.observe(2.0, (1920, 1080), &[helmet.clone()]); // 2 of 3: an event
//! assert_eq!(events[0].rule, helmet.rule);
//! assert!(camera.observe(4.0, (1920, 1080), &[helmet]).is_empty()); // cooling down
//! ```

pub mod config;
pub mod source;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use inspector_core::{BBox, Risk};
use serde::{Deserialize, Serialize};

/// When a rule seen on a camera becomes an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Frames, of the last [`Policy::m`], that must show the rule.
    pub k: usize,
    pub m: usize,
    /// The lowest risk alerted on (高 only, 中 and 高, or all).
    pub min_risk: Risk,
    /// Seconds, per camera and rule, before the same rule can raise another event.
    pub cooldown_s: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            k: 2,
            m: 3,
            min_risk: Risk::Medium,
            cooldown_s: 300.0,
        }
    }
}

impl Policy {
    /// Checks the numbers; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.m == 0 {
            return Err("m must be at least 1".into());
        }
        if self.k == 0 || self.k > self.m {
            return Err(format!(
                "k must be between 1 and m ({}), not {}",
                self.m, self.k
            ));
        }
        if !(self.cooldown_s.is_finite() && self.cooldown_s >= 0.0) {
            return Err(format!(
                "cooldown must be a number of seconds ≥ 0, not {}",
                self.cooldown_s
            ));
        }
        Ok(())
    }

    /// Whether `risk` is at or above the threshold (高 > 中 > 低).
    pub fn alerts_on(&self, risk: Risk) -> bool {
        severity(risk) >= severity(self.min_risk)
    }
}

fn severity(r: Risk) -> u8 {
    match r {
        Risk::High => 3,
        Risk::Medium => 2,
        Risk::Low => 1,
    }
}

/// A polygon in fractions of the frame: `[x, y]` with 0 ≤ x, y ≤ 1, (0, 0) the top left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Polygon(pub Vec<[f64; 2]>);

impl Polygon {
    /// At least three points, each inside the frame, enclosing some area.
    pub fn validate(&self) -> Result<(), String> {
        if self.0.len() < 3 {
            return Err(format!(
                "a polygon needs at least 3 points, this one has {}",
                self.0.len()
            ));
        }
        for (i, [x, y]) in self.0.iter().enumerate() {
            if !(x.is_finite()
                && y.is_finite()
                && (0.0..=1.0).contains(x)
                && (0.0..=1.0).contains(y))
            {
                return Err(format!(
                    "point {} ({x}, {y}) is not inside the frame: coordinates are fractions of \
                     the width and height, from 0 to 1",
                    i + 1
                ));
            }
        }
        if self.area() < 1e-9 {
            return Err("the polygon encloses no area (its points are on one line)".into());
        }
        Ok(())
    }

    /// Shoelace formula.
    pub fn area(&self) -> f64 {
        let p = &self.0;
        let twice: f64 = (0..p.len())
            .map(|i| {
                let [x1, y1] = p[i];
                let [x2, y2] = p[(i + 1) % p.len()];
                x1 * y2 - x2 * y1
            })
            .sum();
        twice.abs() / 2.0
    }

    /// Even-odd ray casting; a point on an edge may fall either way.
    pub fn contains(&self, [x, y]: [f64; 2]) -> bool {
        let p = &self.0;
        let mut inside = false;
        let mut j = p.len() - 1;
        for i in 0..p.len() {
            let [xi, yi] = p[i];
            let [xj, yj] = p[j];
            if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                inside = !inside;
            }
            j = i;
        }
        inside
    }
}

/// A region where the named rules apply (every rule when `rules` is empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Zone {
    pub name: String,
    pub polygon: Polygon,
    /// Canonical citations.
    #[serde(default)]
    pub rules: Vec<String>,
}

/// One camera's zones and ignored regions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Zones {
    #[serde(default)]
    pub zones: Vec<Zone>,
    #[serde(default)]
    pub ignore: Vec<Polygon>,
}

impl Zones {
    /// Whether a violation of `rule` with box `bbox` (pixels of a `width` × `height` frame)
    /// counts. A rule that some zone names counts only with a box whose centre lies in one of
    /// those zones (a violation the model did not place cannot be placed in a zone); any
    /// violation whose box centre lies in an ignored region is dropped.
    pub fn admits(&self, rule: &str, bbox: Option<&BBox>, (width, height): (u32, u32)) -> bool {
        let centre = bbox.map(|b| {
            [
                (b[0] + b[2]) / 2.0 / f64::from(width.max(1)),
                (b[1] + b[3]) / 2.0 / f64::from(height.max(1)),
            ]
        });
        if let Some(c) = centre
            && self.ignore.iter().any(|p| p.contains(c))
        {
            return false;
        }
        let mut restricted = false;
        for zone in &self.zones {
            if zone.rules.is_empty() || zone.rules.iter().any(|r| r == rule) {
                restricted = true;
                if centre.is_some_and(|c| zone.polygon.contains(c)) {
                    return true;
                }
            }
        }
        !restricted
    }
}

/// A violation seen on one frame: its canonical citation, risk and box (pixels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    pub rule: String,
    pub risk: Risk,
    #[serde(rename = "box")]
    pub bbox: Option<BBox>,
}

/// A rule that crossed the policy on a frame: what an event is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub rule: String,
    /// The highest risk the rule was seen with on this frame.
    pub risk: Risk,
    /// The source's time of the frame.
    pub at: f64,
    /// The frame's violations of this rule that counted (after zones and threshold).
    pub seen: Vec<Seen>,
}

/// One camera's alerting state.
#[derive(Debug, Clone)]
pub struct Alerter {
    policy: Policy,
    zones: Zones,
    /// The rules each of the last `m` frames showed (after zones and threshold).
    window: VecDeque<BTreeSet<String>>,
    /// When each rule last raised an event.
    last_event: BTreeMap<String, f64>,
}

impl Alerter {
    pub fn new(policy: Policy, zones: Zones) -> Alerter {
        Alerter {
            policy,
            zones,
            window: VecDeque::new(),
            last_event: BTreeMap::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Takes one frame's violations at source time `at` on a `size` (width, height) frame and
    /// returns the rules that become events now, in citation order.
    pub fn observe(&mut self, at: f64, size: (u32, u32), seen: &[Seen]) -> Vec<Trigger> {
        let mut counted: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
        for s in seen {
            if self.policy.alerts_on(s.risk) && self.zones.admits(&s.rule, s.bbox.as_ref(), size) {
                counted.entry(s.rule.clone()).or_default().push(s.clone());
            }
        }
        self.window.push_back(counted.keys().cloned().collect());
        while self.window.len() > self.policy.m.max(1) {
            self.window.pop_front();
        }
        let mut triggers = Vec::new();
        for (rule, seen) in counted {
            let frames = self.window.iter().filter(|f| f.contains(&rule)).count();
            if frames < self.policy.k {
                continue;
            }
            if let Some(&last) = self.last_event.get(&rule)
                && at - last < self.policy.cooldown_s
            {
                continue;
            }
            self.last_event.insert(rule.clone(), at);
            let risk = seen
                .iter()
                .map(|s| s.risk)
                .max_by_key(|r| severity(*r))
                .expect("a counted rule has a violation");
            triggers.push(Trigger {
                rule,
                risk,
                at,
                seen,
            });
        }
        triggers
    }
}
