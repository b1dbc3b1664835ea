//! Procedural factory scenes with safety hazards, rendered with tiny-skia, and their ground
//! truth in the project's annotation format.
//!
//! A scene is a workshop seen from the front. It has a wall and a floor, a walkway with yellow
//! lines, machines, shelves, an electrical cabinet, a fire extinguisher, an exit door with its
//! green sign, stacks of material, and 0–4 workers. Each [`Hazard`] is drawn the way a person
//! would see it in a photo: a bare head instead of a helmet, a shirt with no reflective vest, a
//! worker bent double over a load, tools lying on the walkway, an open cabinet touched with no
//! lock or tag on it, boxes in front of the exit or the extinguisher, a stack taller than a
//! person. Every hazard cites a clause of the bundled example regulations, and its box is the
//! pixel box of what shows it. Layout, scale, colours, lighting, occlusion and noise vary with
//! the seed. About 30 % of scenes are safe; safe scenes carry the hazards' look-alikes (a tagged
//! open cabinet, a proper squat lift, low stacks, tools on a bench).
//!
//! Generation is deterministic: scene `i` of seed `s` is the same image on every machine.
//!
//! ```
//! use inspector_synth::{Hazard, SynthConfig, render};
//!
//! let config = SynthConfig { width: 224, ..SynthConfig::default() };
//! let scene = render(&config, 7, 0);
//! assert_eq!(scene.image.dimensions(), (224, 168));
//! for v in &scene.violations {
//!     assert!(Hazard::ALL.iter().any(|h| h.violation(None).rule == v.rule));
//! }
//! ```

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::Context;
use image::RgbImage;
use inspector_core::{Annotation, BBox, Risk, Violation};
use rand::{
    Rng, SeedableRng,
    seq::{IndexedRandom, SliceRandom},
};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tiny_skia::{Color, FillRule, LineCap, Paint, PathBuilder, Pixmap, Rect, Stroke, Transform};

/// The hazards a scene can show, each tied to one clause of the bundled example regulations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hazard {
    NoHelmet,
    NoVest,
    BadLift,
    WalkwayDebris,
    CabinetNoLockout,
    BlockedExit,
    StackTooHigh,
}

/// How one hazard appears: its name, its ground truth, and how the renderer shows it. The
/// renderer and the ground truth both read this table ([`Hazard::look`]); a new hazard is a new
/// row and a new painter, and stays out of [`SynthConfig::default`] (opt-in), so that no
/// existing seed changes (`tests/golden.rs`).
#[derive(Debug, Clone, Copy)]
pub struct HazardLook {
    pub hazard: Hazard,
    /// The name used on the command line.
    pub key: &'static str,
    pub description: &'static str,
    /// The clause of the bundled example regulations it breaks.
    pub rule: &'static str,
    pub risk: Risk,
    pub suggestion: &'static str,
    /// Where in the scene it is placed.
    pub placement: &'static str,
    /// The painter that draws it.
    pub painter: &'static str,
    /// What its ground-truth box covers.
    pub bbox: &'static str,
    /// What a scene without it may show that looks alike, so that it must be seen, not guessed.
    pub look_alike: &'static str,
}

/// One row per hazard, in [`Hazard::ALL`]'s order.
pub const LOOKS: [HazardLook; 7] = [
    HazardLook {
        hazard: Hazard::NoHelmet,
        key: "no-helmet",
        description: "作业人员未佩戴安全帽",
        rule: "《安全作业规程》第3.1条",
        risk: Risk::High,
        suggestion: "立即佩戴安全帽并系好下颏带",
        placement: "a worker other than the one at the cabinet",
        painter: "cast_workers, then Worker::draw without the helmet",
        bbox: "the worker, head to feet",
        look_alike: "every other worker wears a helmet in one of four colours",
    },
    HazardLook {
        hazard: Hazard::NoVest,
        key: "no-vest",
        description: "作业人员未穿反光背心",
        rule: "《安全作业规程》第3.2条",
        risk: Risk::Medium,
        suggestion: "在车间内作业或通行时穿好反光背心",
        placement: "a worker other than the one at the cabinet",
        painter: "cast_workers, then Worker::draw without the vest",
        bbox: "the worker, head to feet",
        look_alike: "every other worker wears an orange or lime vest over a shirt of six colours",
    },
    HazardLook {
        hazard: Hazard::BadLift,
        key: "bad-lift",
        description: "弯腰搬运重物，姿势不当",
        rule: "《安全作业规程》第7.1条",
        risk: Risk::Medium,
        suggestion: "屈膝下蹲、保持腰背挺直后再搬运",
        placement: "a worker not at the cabinet, or one of its own",
        painter: "cast_workers, then Worker::draw bent double over a load",
        bbox: "the worker and the load",
        look_alike: "a fifth of the other workers lift with a proper squat",
    },
    HazardLook {
        hazard: Hazard::WalkwayDebris,
        key: "walkway-debris",
        description: "通道内堆放工具和杂物",
        rule: "《现场管理标准》第2.2条",
        risk: Risk::Low,
        suggestion: "立即清理通道，工具放回工具柜",
        placement: "two to four pieces between the walkway's yellow lines",
        painter: "paint_walkway_debris",
        bbox: "all the pieces together",
        look_alike: "tools in their place on a workbench",
    },
    HazardLook {
        hazard: Hazard::CabinetNoLockout,
        key: "cabinet-no-lockout",
        description: "配电柜开门作业未上锁挂牌",
        rule: "《电气安全规程》第十二条",
        risk: Risk::High,
        suggestion: "停电并上锁挂牌，验电确认无电后再作业",
        placement: "the cabinet, open, with a worker reaching into it",
        painter: "paint_cabinet (open), cast_workers (the reaching worker)",
        bbox: "the open cabinet with its door, and the worker touching it",
        look_alike: "an open cabinet with a red padlock and a yellow tag, touched or not",
    },
    HazardLook {
        hazard: Hazard::BlockedExit,
        key: "blocked-exit",
        description: "安全出口或消防器材前堆放物品",
        rule: "《现场管理标准》第2.3.1条",
        risk: Risk::High,
        suggestion: "立即移走堆放物，保持出口和消防器材畅通",
        placement: "in front of the first exit or extinguisher from the left",
        painter: "paint_exit or paint_extinguisher, then blocking_pile",
        bbox: "the exit or extinguisher with its sign, and the pile",
        look_alike: "boxes on shelves and stacks elsewhere along the wall",
    },
    HazardLook {
        hazard: Hazard::StackTooHigh,
        key: "stack-too-high",
        description: "物料堆放过高",
        rule: "《现场管理标准》第3.2条",
        risk: Risk::Medium,
        suggestion: "降低堆放高度至1.5米以下并码放稳固",
        placement: "the stack's slot on the wall, six to eight levels, leaning",
        painter: "paint_stack (tall)",
        bbox: "the stack and its pallet",
        look_alike: "a stack of one to three levels",
    },
];

impl Hazard {
    pub const ALL: [Hazard; 7] = [
        Hazard::NoHelmet,
        Hazard::NoVest,
        Hazard::BadLift,
        Hazard::WalkwayDebris,
        Hazard::CabinetNoLockout,
        Hazard::BlockedExit,
        Hazard::StackTooHigh,
    ];

    /// This hazard's row of [`LOOKS`].
    pub fn look(self) -> &'static HazardLook {
        LOOKS
            .iter()
            .find(|l| l.hazard == self)
            .expect("every hazard has a row")
    }

    /// The name used on the command line (`no-helmet`, …).
    pub fn key(self) -> &'static str {
        self.look().key
    }

    pub fn from_key(key: &str) -> Option<Hazard> {
        Hazard::ALL.into_iter().find(|h| h.key() == key)
    }

    /// The ground-truth violation for this hazard, with `bbox` in pixels.
    pub fn violation(self, bbox: Option<BBox>) -> Violation {
        let look = self.look();
        Violation {
            description: look.description.into(),
            rule: look.rule.into(),
            risk: look.risk,
            suggestion: Some(look.suggestion.into()),
            bbox,
        }
    }

    /// The hazard whose ground truth has this description.
    pub fn from_description(description: &str) -> Option<Hazard> {
        Hazard::ALL
            .into_iter()
            .find(|h| h.look().description == description)
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Image width in pixels; the height is three quarters of it.
    pub width: u32,
    /// The hazards scenes may show; the others never appear (their look-alikes still do).
    pub hazards: Vec<Hazard>,
    /// Share of scenes with no hazard.
    pub safe_fraction: f64,
    /// Hazards that appear in at least half of the unsafe scenes (for a stage that teaches them).
    pub boost: Vec<Hazard>,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            width: 448,
            hazards: Hazard::ALL.to_vec(),
            safe_fraction: 0.3,
            boost: Vec::new(),
        }
    }
}

/// One rendered scene.
pub struct Scene {
    pub image: RgbImage,
    /// In a fixed order: by hazard, then left to right.
    pub violations: Vec<Violation>,
}

type Rgb = [u8; 3];

fn paint(c: Rgb, alpha: u8) -> Paint<'static> {
    let mut p = Paint::default();
    p.set_color(Color::from_rgba8(c[0], c[1], c[2], alpha));
    p.anti_alias = true;
    p
}

fn jitter(c: Rgb, rng: &mut ChaCha8Rng, amount: i32) -> Rgb {
    c.map(|v| (v as i32 + rng.random_range(-amount..=amount)).clamp(0, 255) as u8)
}

fn shade(c: Rgb, f: f32) -> Rgb {
    c.map(|v| (v as f32 * f).clamp(0.0, 255.0) as u8)
}

/// Axis-aligned box `[x0, y0, x1, y1]` helpers.
fn union(a: BBox, b: BBox) -> BBox {
    [
        a[0].min(b[0]),
        a[1].min(b[1]),
        a[2].max(b[2]),
        a[3].max(b[3]),
    ]
}

struct Canvas {
    pix: Pixmap,
}

impl Canvas {
    fn rect(&mut self, x: f32, y: f32, w: f32, h: f32, c: Rgb) {
        self.rect_a(x, y, w, h, c, 255);
    }

    fn rect_a(&mut self, x: f32, y: f32, w: f32, h: f32, c: Rgb, alpha: u8) {
        if let Some(r) = Rect::from_xywh(x, y, w.max(0.5), h.max(0.5)) {
            self.pix
                .fill_rect(r, &paint(c, alpha), Transform::identity(), None);
        }
    }

    fn rect_t(&mut self, x: f32, y: f32, w: f32, h: f32, c: Rgb, t: Transform) {
        if let Some(r) = Rect::from_xywh(x, y, w.max(0.5), h.max(0.5)) {
            self.pix.fill_rect(r, &paint(c, 255), t, None);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn oval(&mut self, x: f32, y: f32, w: f32, h: f32, c: Rgb, alpha: u8, t: Transform) {
        if let Some(r) = Rect::from_xywh(x, y, w.max(0.5), h.max(0.5))
            && let Some(p) = PathBuilder::from_oval(r)
        {
            self.pix
                .fill_path(&p, &paint(c, alpha), FillRule::Winding, t, None);
        }
    }

    fn line(&mut self, pts: &[(f32, f32)], width: f32, c: Rgb, t: Transform) {
        let mut pb = PathBuilder::new();
        pb.move_to(pts[0].0, pts[0].1);
        for &(x, y) in &pts[1..] {
            pb.line_to(x, y);
        }
        if let Some(p) = pb.finish() {
            let stroke = Stroke {
                width,
                line_cap: LineCap::Round,
                ..Stroke::default()
            };
            self.pix.stroke_path(&p, &paint(c, 255), &stroke, t, None);
        }
    }

    fn poly(&mut self, pts: &[(f32, f32)], c: Rgb) {
        let mut pb = PathBuilder::new();
        pb.move_to(pts[0].0, pts[0].1);
        for &(x, y) in &pts[1..] {
            pb.line_to(x, y);
        }
        pb.close();
        if let Some(p) = pb.finish() {
            self.pix.fill_path(
                &p,
                &paint(c, 255),
                FillRule::Winding,
                Transform::identity(),
                None,
            );
        }
    }

    /// A cardboard box or crate with an edge and a tape line.
    fn crate_box(&mut self, x: f32, y: f32, w: f32, h: f32, c: Rgb) {
        self.rect(x, y, w, h, shade(c, 0.7));
        self.rect(x + 1.0, y + 1.0, w - 2.0, h - 2.0, c);
        self.rect(x + w * 0.45, y + 1.0, w * 0.1, h - 2.0, shade(c, 0.85));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Posture {
    Standing,
    /// Bent at the hips over a load on the floor (the hazard).
    BadLift,
    /// Squatting with a straight back (the safe way).
    GoodLift,
    /// One arm stretched out sideways (into a cabinet).
    Reaching,
}

struct Worker {
    x: f32,
    feet: f32,
    h: f32,
    dir: f32,
    helmet: Option<Rgb>,
    vest: bool,
    vest_color: Rgb,
    shirt: Rgb,
    pants: Rgb,
    skin: Rgb,
    hair: Rgb,
    posture: Posture,
}

const HELMETS: [Rgb; 4] = [
    [250, 210, 20],
    [245, 245, 240],
    [230, 60, 40],
    [40, 90, 200],
];
const SHIRTS: [Rgb; 6] = [
    [60, 80, 140],
    [90, 90, 95],
    [40, 110, 150],
    [120, 100, 80],
    [200, 200, 205],
    [70, 60, 90],
];
const VESTS: [Rgb; 2] = [[255, 120, 20], [200, 240, 40]];

impl Worker {
    /// Draws the worker and returns its pixel box.
    fn draw(&self, cv: &mut Canvas) -> BBox {
        let h = self.h;
        let r = 0.075 * h;
        let tw = 0.28 * h;
        let leg_w = 0.1 * h;
        let hip_y = self.feet - 0.47 * h;
        let d = self.dir;
        // Shadow on the floor.
        cv.oval(
            self.x - 0.3 * h,
            self.feet - 0.03 * h,
            0.6 * h,
            0.06 * h,
            [0, 0, 0],
            60,
            Transform::identity(),
        );
        let mut bbox;
        // Legs.
        match self.posture {
            Posture::GoodLift => {
                let hip = self.feet - 0.27 * h;
                let knee = (self.x + d * 0.16 * h, hip);
                for off in [-0.04 * h, 0.04 * h] {
                    cv.line(
                        &[(self.x, hip + off * 0.3), knee, (knee.0, self.feet)],
                        leg_w,
                        self.pants,
                        Transform::identity(),
                    );
                }
                bbox = [
                    self.x.min(knee.0) as f64 - leg_w as f64,
                    0.0,
                    self.x.max(knee.0) as f64 + leg_w as f64,
                    self.feet as f64,
                ];
            }
            _ => {
                for off in [-0.07 * h, 0.07 * h] {
                    cv.rect(
                        self.x + off - leg_w / 2.0,
                        hip_y,
                        leg_w,
                        self.feet - hip_y,
                        self.pants,
                    );
                    cv.rect(
                        self.x + off - leg_w / 2.0 - 1.0,
                        self.feet - 0.03 * h,
                        leg_w + 2.0 + d * 2.0,
                        0.03 * h,
                        [30, 30, 30],
                    );
                }
                bbox = [
                    (self.x - tw / 2.0) as f64,
                    0.0,
                    (self.x + tw / 2.0) as f64,
                    self.feet as f64,
                ];
            }
        }
        // Upper body, drawn upright around the hip point and rotated for a bad lift.
        let hip = match self.posture {
            Posture::GoodLift => self.feet - 0.27 * h,
            _ => hip_y,
        };
        let angle = if self.posture == Posture::BadLift {
            80.0 * d
        } else {
            0.0
        };
        let t = Transform::from_rotate_at(angle, self.x, hip);
        let torso_h = 0.33 * h;
        let sh = hip - torso_h;
        cv.rect_t(self.x - tw / 2.0, sh, tw, torso_h + 0.02 * h, self.shirt, t);
        if self.vest {
            let c = self.vest_color;
            cv.rect_t(self.x - tw / 2.0, sh, tw * 0.42, torso_h * 0.95, c, t);
            cv.rect_t(self.x + tw * 0.08, sh, tw * 0.42, torso_h * 0.95, c, t);
            for f in [0.45, 0.72] {
                cv.rect_t(
                    self.x - tw / 2.0,
                    sh + torso_h * f,
                    tw,
                    torso_h * 0.08,
                    [225, 225, 230],
                    t,
                );
            }
        }
        // Head, then helmet or hair.
        let head_cy = sh - 0.2 * r - r;
        cv.oval(self.x - r, head_cy - r, 2.0 * r, 2.0 * r, self.skin, 255, t);
        match self.helmet {
            Some(c) => {
                cv.oval(
                    self.x - 1.2 * r,
                    head_cy - 1.45 * r,
                    2.4 * r,
                    1.9 * r,
                    c,
                    255,
                    t,
                );
                cv.rect_t(
                    self.x - 1.35 * r,
                    head_cy - 0.45 * r,
                    2.7 * r,
                    0.3 * r,
                    shade(c, 0.85),
                    t,
                );
            }
            None => {
                cv.oval(
                    self.x - 1.02 * r,
                    head_cy - 1.1 * r,
                    2.04 * r,
                    1.2 * r,
                    self.hair,
                    255,
                    t,
                );
            }
        }
        // Arms.
        let arm_w = 0.065 * h;
        let sleeve = if self.vest {
            self.shirt
        } else {
            shade(self.shirt, 0.9)
        };
        match self.posture {
            Posture::Reaching => {
                cv.line(
                    &[
                        (self.x + d * tw * 0.45, sh + 0.04 * h),
                        (self.x + d * (tw * 0.45 + 0.38 * h), sh + 0.08 * h),
                    ],
                    arm_w,
                    sleeve,
                    t,
                );
                cv.line(
                    &[
                        (self.x - d * tw * 0.45, sh + 0.04 * h),
                        (self.x - d * tw * 0.5, hip + 0.02 * h),
                    ],
                    arm_w,
                    sleeve,
                    t,
                );
                let reach = self.x + d * (tw * 0.45 + 0.38 * h);
                bbox[0] = bbox[0].min(reach as f64);
                bbox[2] = bbox[2].max(reach as f64);
            }
            Posture::GoodLift => {
                // Arms forward holding a box at the knees.
                let bx = self.x + d * 0.2 * h;
                cv.line(
                    &[(self.x, sh + 0.04 * h), (bx, hip - 0.02 * h)],
                    arm_w,
                    sleeve,
                    t,
                );
                let bw = 0.22 * h;
                let box_x = if d > 0.0 {
                    bx - 0.02 * h
                } else {
                    bx - bw + 0.02 * h
                };
                cv.crate_box(box_x, hip - 0.14 * h, bw, 0.16 * h, [190, 150, 100]);
                bbox[0] = bbox[0].min(box_x as f64);
                bbox[2] = bbox[2].max((box_x + bw) as f64);
            }
            _ => {
                for side in [-1.0, 1.0] {
                    cv.line(
                        &[
                            (self.x + side * tw * 0.5, sh + 0.04 * h),
                            (self.x + side * tw * 0.55, hip + 0.03 * h),
                        ],
                        arm_w,
                        sleeve,
                        t,
                    );
                }
            }
        }
        // Box extents of the upper body.
        let top_local = head_cy - 1.45 * r;
        match self.posture {
            Posture::BadLift => {
                // Rotated by 80°: the upper body lies roughly horizontal towards `dir`.
                let reach = hip - top_local;
                let far = self.x + d * reach;
                bbox[0] = bbox[0].min(far.min(self.x) as f64);
                bbox[2] = bbox[2].max(far.max(self.x) as f64);
                bbox[1] = (hip - tw * 0.6) as f64;
                // The load on the floor under the hands.
                let lx = self.x + d * torso_h * 0.8;
                let lw = 0.24 * h;
                let box_x = lx - lw / 2.0;
                cv.crate_box(box_x, self.feet - 0.17 * h, lw, 0.17 * h, [185, 145, 95]);
                // Arms hanging from the shoulders to the load.
                cv.line(
                    &[
                        (self.x + d * torso_h * 0.9, hip + tw * 0.1),
                        (lx, self.feet - 0.16 * h),
                    ],
                    arm_w,
                    self.shirt,
                    Transform::identity(),
                );
                bbox[0] = bbox[0].min(box_x as f64);
                bbox[2] = bbox[2].max((box_x + lw) as f64);
            }
            _ => bbox[1] = top_local as f64,
        }
        bbox
    }
}

fn scene_rng(seed: u64, index: u64) -> ChaCha8Rng {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("inspector-synth/{seed}/{index}"));
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&digest);
    ChaCha8Rng::from_seed(bytes)
}

/// Renders scene `index` of `seed`.
pub fn render(config: &SynthConfig, seed: u64, index: u64) -> Scene {
    let mut rng = scene_rng(seed, index);
    let w = config.width.max(64);
    let h = w * 3 / 4;
    let (wf, hf) = (w as f32, h as f32);
    let u = wf / 448.0;
    let active = choose_hazards(config, &mut rng);
    let has = |hz: Hazard| active.contains(&hz);
    let mut cv = Canvas {
        pix: Pixmap::new(w, h).expect("non-zero size"),
    };
    let Room {
        horizon,
        walk0,
        walk1,
    } = paint_room(&mut cv, &mut rng, wf, hf, u);
    // Wall items in slots, left to right.
    let mut items = vec![Item::Cabinet, Item::Extinguisher, Item::Exit, Item::Stack];
    let mut extra = [Item::Machine, Item::Shelf, Item::Machine, Item::Bench];
    extra.shuffle(&mut rng);
    items.extend_from_slice(&extra[..rng.random_range(1..=3)]);
    items.shuffle(&mut rng);
    let slot = wf / items.len() as f32;
    let mut boxes: Vec<(Hazard, BBox)> = Vec::new();
    let mut cabinet_at: Option<(f32, f32, f32, f32)> = None;
    let cabinet_open = has(Hazard::CabinetNoLockout) || rng.random_bool(0.35);
    for (i, &item) in items.iter().enumerate() {
        let cx = slot * (i as f32 + 0.5) + rng.random_range(-0.15..0.15) * slot;
        let base = horizon + rng.random_range(2.0..14.0) * u;
        let at = Spot {
            cx,
            base,
            slot,
            horizon,
            u,
        };
        match item {
            Item::Cabinet => cabinet_at = Some(paint_cabinet(&mut cv, &mut rng, at, cabinet_open)),
            Item::Extinguisher | Item::Exit => {
                let front = if item == Item::Extinguisher {
                    paint_extinguisher(&mut cv, &mut rng, at)
                } else {
                    paint_exit(&mut cv, &mut rng, at)
                };
                // The first exit or extinguisher of a scene with the hazard is blocked.
                if has(Hazard::BlockedExit) && !boxes.iter().any(|b| b.0 == Hazard::BlockedExit) {
                    let bb = blocking_pile(&mut cv, &mut rng, cx, base + 4.0 * u, u);
                    boxes.push((Hazard::BlockedExit, union(front, bb)));
                }
            }
            Item::Machine => paint_machine(&mut cv, &mut rng, at),
            Item::Shelf => paint_shelf(&mut cv, &mut rng, at),
            Item::Bench => paint_bench(&mut cv, &mut rng, at),
            Item::Stack => {
                if let Some(b) = paint_stack(&mut cv, &mut rng, at, has(Hazard::StackTooHigh)) {
                    boxes.push((Hazard::StackTooHigh, b));
                }
            }
        }
    }
    // Debris on the walkway (or nothing).
    if has(Hazard::WalkwayDebris) {
        let b = paint_walkway_debris(&mut cv, &mut rng, wf, u, walk0, walk1);
        boxes.push((Hazard::WalkwayDebris, b));
    }
    // Workers, back to front.
    let needs_toucher = has(Hazard::CabinetNoLockout);
    let mut workers = cast_workers(
        &mut rng,
        &active,
        Cast {
            cabinet_at,
            cabinet_open,
            horizon,
            wf,
            hf,
            u,
        },
    );
    // Lockout tag on an open cabinet that is safe to touch.
    if let Some((x, y, cw, ch)) = cabinet_at
        && cabinet_open
    {
        let touched = workers.iter().any(|(w, _)| w.posture == Posture::Reaching);
        if touched && needs_toucher {
            let b = [x as f64, y as f64, (x + cw * 1.5) as f64, (y + ch) as f64];
            boxes.push((Hazard::CabinetNoLockout, b));
        } else {
            // Red padlock and yellow tag on the door.
            let (lx, ly) = (x + cw * 1.2, y + ch * 0.45);
            cv.rect(lx, ly, 7.0 * u, 7.0 * u, [210, 20, 20]);
            cv.line(
                &[
                    (lx + 1.5 * u, ly),
                    (lx + 3.5 * u, ly - 4.0 * u),
                    (lx + 5.5 * u, ly),
                ],
                1.5 * u,
                [180, 180, 180],
                Transform::identity(),
            );
            cv.rect(
                lx + 1.0 * u,
                ly + 8.0 * u,
                9.0 * u,
                14.0 * u,
                [250, 220, 30],
            );
            cv.rect(lx + 2.0 * u, ly + 11.0 * u, 7.0 * u, 2.0 * u, [20, 20, 20]);
        }
    }
    workers.sort_by(|a, b| a.0.feet.total_cmp(&b.0.feet));
    for (wk, hs) in &workers {
        let b = wk.draw(&mut cv);
        for hz in hs {
            boxes.push((*hz, b));
        }
        if needs_toucher && wk.posture == Posture::Reaching {
            // The cabinet box grows to take in the worker touching it.
            for (hz, bb) in boxes.iter_mut() {
                if *hz == Hazard::CabinetNoLockout {
                    *bb = union(*bb, b);
                }
            }
        }
    }
    let image = develop(&cv, &mut rng, w, h);
    let clamp = |b: BBox| -> BBox {
        [
            b[0].clamp(0.0, w as f64),
            b[1].clamp(0.0, h as f64),
            b[2].clamp(0.0, w as f64),
            b[3].clamp(0.0, h as f64),
        ]
        .map(|v| v.round())
    };
    boxes.sort_by(|a, b| a.0.cmp(&b.0).then(a.1[0].total_cmp(&b.1[0])));
    let violations = boxes
        .into_iter()
        .map(|(hz, b)| hz.violation(Some(clamp(b))))
        .collect();
    Scene { image, violations }
}

/// Which hazards a scene shows: none for a safe scene, else one to three of the configured
/// ones (a boosted hazard first in half of them).
fn choose_hazards(config: &SynthConfig, rng: &mut ChaCha8Rng) -> Vec<Hazard> {
    let mut active: Vec<Hazard> = Vec::new();
    if !config.hazards.is_empty() && !rng.random_bool(config.safe_fraction.clamp(0.0, 1.0)) {
        let boosted: Vec<Hazard> = config
            .boost
            .iter()
            .copied()
            .filter(|b| config.hazards.contains(b))
            .collect();
        if !boosted.is_empty() && rng.random_bool(0.5) {
            active.push(*boosted.choose(rng).unwrap());
        }
        let n = rng.random_range(1..=3usize);
        let mut pool = config.hazards.clone();
        pool.shuffle(rng);
        for hz in pool {
            if active.len() >= n.max(active.len()) {
                break;
            }
            if !active.contains(&hz) {
                active.push(hz);
            }
        }
    }
    active
}

/// The lines a room is laid out on: the horizon (where wall meets floor) and the two
/// yellow lines of the walkway.
struct Room {
    horizon: f32,
    walk0: f32,
    walk1: f32,
}

/// Wall, floor and the walkway between two yellow lines.
fn paint_room(cv: &mut Canvas, rng: &mut ChaCha8Rng, wf: f32, hf: f32, u: f32) -> Room {
    // Wall and floor.
    let horizon = hf * rng.random_range(0.4..0.5);
    let wall = jitter(
        *[
            [200, 200, 190],
            [170, 185, 195],
            [215, 205, 180],
            [160, 165, 160],
        ]
        .choose(rng)
        .unwrap(),
        rng,
        12,
    );
    let floor = jitter(
        *[
            [120, 130, 120],
            [150, 145, 135],
            [95, 110, 105],
            [135, 120, 100],
        ]
        .choose(rng)
        .unwrap(),
        rng,
        10,
    );
    cv.rect(0.0, 0.0, wf, horizon, wall);
    cv.rect(0.0, horizon, wf, hf - horizon, floor);
    cv.rect(0.0, horizon - 6.0 * u, wf, 6.0 * u, shade(wall, 0.75));
    // Walkway between two yellow lines.
    let walk0 = horizon + (hf - horizon) * rng.random_range(0.45..0.55);
    let walk1 = walk0 + (hf - horizon) * rng.random_range(0.22..0.3);
    for y in [walk0, walk1] {
        cv.rect(0.0, y, wf, 3.0 * u, [235, 200, 30]);
    }
    Room {
        horizon,
        walk0,
        walk1,
    }
}

/// Two to four pieces of debris on the walkway; returns the box around them all.
fn paint_walkway_debris(
    cv: &mut Canvas,
    rng: &mut ChaCha8Rng,
    wf: f32,
    u: f32,
    walk0: f32,
    walk1: f32,
) -> BBox {
    let n = rng.random_range(2..=4);
    let mut bb: Option<BBox> = None;
    let x_start = rng.random_range(0.1..0.6) * wf;
    for k in 0..n {
        let x = x_start + k as f32 * rng.random_range(30.0..50.0) * u;
        let y = rng.random_range(walk0 + 18.0 * u..walk1 - 2.0 * u);
        let b = debris(cv, rng, x, y, u);
        bb = Some(bb.map_or(b, |a| union(a, b)));
    }
    bb.expect("at least two items")
}

/// Lighting (a brightness ramp across the scene and a vignette), then sensor noise.
fn develop(cv: &Canvas, rng: &mut ChaCha8Rng, w: u32, h: u32) -> RgbImage {
    let (wf, hf) = (w as f32, h as f32);
    let gain = rng.random_range(0.75..1.15f32);
    let ramp = rng.random_range(-0.2..0.2f32);
    let noise = rng.random_range(2.0..9.0f32);
    let mut image = RgbImage::new(w, h);
    let data = cv.pix.data();
    for (i, px) in image.pixels_mut().enumerate() {
        let (x, y) = ((i as u32 % w) as f32 / wf, (i as u32 / w) as f32 / hf);
        let vignette = 1.0 - 0.25 * ((x - 0.5).powi(2) + (y - 0.5).powi(2));
        let light = gain * (1.0 + ramp * (x - 0.5)) * vignette;
        for c in 0..3 {
            let v = data[4 * i + c] as f32 * light + rng.random_range(-noise..noise);
            px.0[c] = v.clamp(0.0, 255.0) as u8;
        }
    }
    image
}

/// What placing workers depends on.
#[derive(Clone, Copy)]
struct Cast {
    cabinet_at: Option<(f32, f32, f32, f32)>,
    cabinet_open: bool,
    horizon: f32,
    wf: f32,
    hf: f32,
    u: f32,
}

/// The scene's workers and the hazards each shows: a worker reaching into the cabinet when the
/// cabinet hazard needs one (or, by chance, into an open one), the others standing or lifting
/// well anywhere on the floor; then each worker hazard (no helmet, no vest, a bad lift) given
/// to a worker other than the one at the cabinet.
fn cast_workers(rng: &mut ChaCha8Rng, active: &[Hazard], cast: Cast) -> Vec<(Worker, Vec<Hazard>)> {
    let Cast {
        cabinet_at,
        cabinet_open,
        horizon,
        wf,
        hf,
        u,
    } = cast;
    let has = |hz: Hazard| active.contains(&hz);
    let worker_hazards: Vec<Hazard> = [Hazard::NoHelmet, Hazard::NoVest, Hazard::BadLift]
        .into_iter()
        .filter(|h| has(*h))
        .collect();
    let needs_toucher = has(Hazard::CabinetNoLockout);
    let min_workers = worker_hazards.len().min(1) + needs_toucher as usize;
    let n_workers = rng.random_range(min_workers..=4usize.max(min_workers));
    let mut workers: Vec<(Worker, Vec<Hazard>)> = Vec::new();
    for k in 0..n_workers {
        let toucher = k == 0 && (needs_toucher || (cabinet_open && rng.random_bool(0.5)));
        let (x, feet, hgt, dir, posture) = if toucher {
            let (cx0, cy, cw, _) = cabinet_at.expect("every scene has a cabinet");
            let hgt = (horizon - cy + 0.35 * (hf - horizon)).clamp(80.0 * u, 130.0 * u);
            let left = cx0 > wf / 2.0;
            let dir = if left { 1.0 } else { -1.0 };
            let x = if left {
                cx0 - 0.3 * hgt
            } else {
                cx0 + cw + 0.3 * hgt
            };
            (
                x,
                horizon + 0.35 * (hf - horizon),
                hgt,
                dir,
                Posture::Reaching,
            )
        } else {
            let feet = rng.random_range(horizon + 0.25 * (hf - horizon)..hf - 4.0 * u);
            let depth = (feet - horizon) / (hf - horizon);
            let hgt = (70.0 + 60.0 * depth) * u * rng.random_range(0.92..1.08);
            let x = rng.random_range(0.08..0.92) * wf;
            let dir = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            let posture = if rng.random_bool(0.2) {
                Posture::GoodLift
            } else {
                Posture::Standing
            };
            (x, feet, hgt, dir, posture)
        };
        workers.push((
            Worker {
                x,
                feet,
                h: hgt,
                dir,
                helmet: Some(*HELMETS.choose(rng).unwrap()),
                vest: true,
                vest_color: *VESTS.choose(rng).unwrap(),
                shirt: jitter(*SHIRTS.choose(rng).unwrap(), rng, 12),
                pants: jitter([45, 55, 80], rng, 15),
                skin: jitter([225, 180, 140], rng, 20),
                hair: jitter([40, 30, 25], rng, 10),
                posture,
            },
            Vec::new(),
        ));
    }
    // Give each worker hazard to a non-touching worker (or the toucher when alone).
    for hz in worker_hazards {
        let candidates: Vec<usize> = (0..workers.len())
            .filter(|&i| !(needs_toucher && i == 0) || workers.len() == 1)
            .collect();
        let i = *candidates.choose(rng).expect("at least one worker");
        let (wk, hs) = &mut workers[i];
        match hz {
            Hazard::NoHelmet => wk.helmet = None,
            Hazard::NoVest => wk.vest = false,
            Hazard::BadLift => {
                if wk.posture != Posture::Reaching {
                    wk.posture = Posture::BadLift;
                } else {
                    continue;
                }
            }
            _ => unreachable!(),
        }
        hs.push(hz);
    }
    // A BadLift that could not be placed (only a reaching worker) gets its own worker.
    if has(Hazard::BadLift) && !workers.iter().any(|(_, hs)| hs.contains(&Hazard::BadLift)) {
        let feet = rng.random_range(horizon + 0.4 * (hf - horizon)..hf - 4.0 * u);
        let depth = (feet - horizon) / (hf - horizon);
        workers.push((
            Worker {
                x: rng.random_range(0.1..0.9) * wf,
                feet,
                h: (70.0 + 60.0 * depth) * u,
                dir: 1.0,
                helmet: Some(HELMETS[0]),
                vest: true,
                vest_color: VESTS[0],
                shirt: SHIRTS[0],
                pants: [45, 55, 80],
                skin: [225, 180, 140],
                hair: [40, 30, 25],
                posture: Posture::BadLift,
            },
            vec![Hazard::BadLift],
        ));
    }
    workers
}

/// The items along the wall, one slot each, left to right.
#[derive(Clone, Copy, PartialEq)]
enum Item {
    Cabinet,
    Extinguisher,
    Exit,
    Machine,
    Shelf,
    Stack,
    Bench,
}

/// Where an item stands: its slot's centre and width, its base line, the horizon and the
/// scale (pixels per unit of a 448-pixel-wide scene).
#[derive(Clone, Copy)]
struct Spot {
    cx: f32,
    base: f32,
    slot: f32,
    horizon: f32,
    u: f32,
}

/// An electrical cabinet on the wall, open (dark inside, breakers, door swung out) or shut;
/// returns its rectangle `(x, y, w, h)`.
fn paint_cabinet(
    cv: &mut Canvas,
    rng: &mut ChaCha8Rng,
    at: Spot,
    open: bool,
) -> (f32, f32, f32, f32) {
    let Spot { cx, horizon, u, .. } = at;
    let (cw, ch) = (
        rng.random_range(40.0..56.0) * u,
        rng.random_range(64.0..84.0) * u,
    );
    let (x, y) = (
        cx - cw / 2.0,
        horizon - ch - rng.random_range(4.0..20.0) * u,
    );
    let body = jitter([150, 155, 160], rng, 10);
    cv.rect(x, y, cw, ch, shade(body, 0.7));
    cv.rect(x + 2.0 * u, y + 2.0 * u, cw - 4.0 * u, ch - 4.0 * u, body);
    // Warning triangle.
    cv.poly(
        &[
            (cx, y + 6.0 * u),
            (cx - 6.0 * u, y + 16.0 * u),
            (cx + 6.0 * u, y + 16.0 * u),
        ],
        [250, 210, 0],
    );
    if open {
        cv.rect(
            x + 3.0 * u,
            y + 3.0 * u,
            cw - 6.0 * u,
            ch - 6.0 * u,
            [35, 35, 40],
        );
        for k in 0..4 {
            let by = y + ch * (0.2 + 0.17 * k as f32);
            cv.rect(x + 7.0 * u, by, cw - 14.0 * u, 5.0 * u, [200, 200, 190]);
        }
        cv.poly(
            &[
                (x + cw, y),
                (x + cw + cw * 0.5, y + 6.0 * u),
                (x + cw + cw * 0.5, y + ch - 6.0 * u),
                (x + cw, y + ch),
            ],
            shade(body, 1.08),
        );
    }
    (x, y, cw, ch)
}

/// A fire extinguisher with its hose and the red sign above; returns the box of what must
/// stay reachable (sign to floor).
fn paint_extinguisher(cv: &mut Canvas, rng: &mut ChaCha8Rng, at: Spot) -> BBox {
    let Spot { cx, base, u, .. } = at;
    let (ew, eh) = (12.0 * u, rng.random_range(30.0..38.0) * u);
    let (x, y) = (cx - ew / 2.0, base - eh);
    cv.rect(x, y, ew, eh, [200, 25, 25]);
    cv.rect(x + ew * 0.3, y - 5.0 * u, ew * 0.4, 5.0 * u, [40, 40, 40]);
    cv.rect(
        x + 1.0 * u,
        y + eh * 0.3,
        ew - 2.0 * u,
        eh * 0.25,
        [240, 240, 240],
    );
    cv.line(
        &[(x + ew * 0.5, y - 4.0 * u), (x - 4.0 * u, y + eh * 0.5)],
        2.0 * u,
        [30, 30, 30],
        Transform::identity(),
    );
    // Sign above.
    cv.rect(
        x - 2.0 * u,
        y - 24.0 * u,
        ew + 4.0 * u,
        12.0 * u,
        [210, 30, 30],
    );
    [
        x as f64,
        (y - 24.0 * u) as f64,
        (x + ew) as f64,
        base as f64,
    ]
}

/// An exit door with the green running-figure sign; returns the box of what must stay
/// clear (sign to floor).
fn paint_exit(cv: &mut Canvas, rng: &mut ChaCha8Rng, at: Spot) -> BBox {
    let Spot { cx, base, u, .. } = at;
    let (dw, dh) = (
        rng.random_range(46.0..60.0) * u,
        rng.random_range(84.0..100.0) * u,
    );
    let (x, y) = (cx - dw / 2.0, base - dh);
    let door = jitter([110, 120, 130], rng, 15);
    cv.rect(
        x - 3.0 * u,
        y - 3.0 * u,
        dw + 6.0 * u,
        dh + 3.0 * u,
        shade(door, 0.6),
    );
    cv.rect(x, y, dw, dh, door);
    cv.rect(
        x + dw * 0.8,
        y + dh * 0.5,
        4.0 * u,
        8.0 * u,
        [220, 220, 220],
    );
    // The green exit sign with a running figure.
    let (sx, sy) = (cx - 16.0 * u, y - 20.0 * u);
    cv.rect(sx, sy, 32.0 * u, 12.0 * u, [20, 160, 70]);
    cv.rect(
        sx + 4.0 * u,
        sy + 3.0 * u,
        5.0 * u,
        6.0 * u,
        [240, 255, 240],
    );
    cv.poly(
        &[
            (sx + 14.0 * u, sy + 4.0 * u),
            (sx + 26.0 * u, sy + 6.0 * u),
            (sx + 14.0 * u, sy + 8.0 * u),
        ],
        [240, 255, 240],
    );
    [x as f64, sy as f64, (x + dw) as f64, base as f64]
}

/// A machine against the wall, sized to its slot.
fn paint_machine(cv: &mut Canvas, rng: &mut ChaCha8Rng, at: Spot) {
    let Spot {
        cx, base, slot, u, ..
    } = at;
    let (mw, mh) = (
        (0.9 * slot).clamp(40.0 * u, 110.0 * u) * rng.random_range(0.7..1.0),
        rng.random_range(50.0..80.0) * u,
    );
    let c = jitter(
        *[[70, 110, 150], [80, 130, 90], [150, 150, 150]]
            .choose(rng)
            .unwrap(),
        rng,
        15,
    );
    let (x, y) = (cx - mw / 2.0, base + 10.0 * u - mh);
    cv.rect(x, y, mw, mh, shade(c, 0.7));
    cv.rect(x + 2.0 * u, y + 2.0 * u, mw - 4.0 * u, mh * 0.6, c);
    cv.rect(
        x + mw * 0.6,
        y + mh * 0.15,
        mw * 0.25,
        mh * 0.2,
        [30, 50, 60],
    );
    cv.oval(
        x + mw * 0.15,
        y + mh * 0.2,
        8.0 * u,
        8.0 * u,
        [220, 30, 30],
        255,
        Transform::identity(),
    );
}

/// A shelf of three levels filled with boxes.
fn paint_shelf(cv: &mut Canvas, rng: &mut ChaCha8Rng, at: Spot) {
    let Spot { cx, base, u, .. } = at;
    let (sw, sh) = (
        rng.random_range(60.0..80.0) * u,
        rng.random_range(80.0..100.0) * u,
    );
    let (x, y) = (cx - sw / 2.0, base - sh);
    let frame = [50, 80, 160];
    for k in 0..4 {
        let ly = y + sh * k as f32 / 3.0;
        cv.rect(x, ly - 2.0 * u, sw, 3.0 * u, [230, 120, 30]);
        if k < 3 {
            let mut bx = x + 2.0 * u;
            while bx < x + sw - 12.0 * u {
                let bw = rng.random_range(8.0..16.0) * u;
                let room = sh / 3.0 - 6.0 * u;
                let bh = if room > 8.5 {
                    rng.random_range(8.0..room)
                } else {
                    // Small images: boxes scale with the shelf.
                    rng.random_range(0.5..1.0) * room.max(2.0)
                };
                let c = jitter([180, 140, 90], rng, 25);
                cv.crate_box(
                    bx,
                    ly + sh / 3.0 - 2.0 * u - bh,
                    bw.min(x + sw - bx - 2.0 * u),
                    bh,
                    c,
                );
                bx += bw + 2.0 * u;
            }
        }
    }
    cv.rect(x, y, 3.0 * u, sh, frame);
    cv.rect(x + sw - 3.0 * u, y, 3.0 * u, sh, frame);
}

/// A workbench with tools on it: tools in their place (the look-alike of walkway debris).
fn paint_bench(cv: &mut Canvas, rng: &mut ChaCha8Rng, at: Spot) {
    let Spot { cx, base, u, .. } = at;
    let (bw, bh) = (rng.random_range(60.0..80.0) * u, 34.0 * u);
    let (x, y) = (cx - bw / 2.0, base - bh);
    cv.rect(x, y, bw, 5.0 * u, [120, 80, 50]);
    cv.rect(x + 3.0 * u, y, 4.0 * u, bh, [90, 60, 40]);
    cv.rect(x + bw - 7.0 * u, y, 4.0 * u, bh, [90, 60, 40]);
    draw_tools(cv, rng, x + 6.0 * u, y - 1.0 * u, bw - 12.0 * u, u);
}

/// Boxes stacked on a pallet: one to three levels, or six to eight leaning a little when
/// `tall` (the stack-too-high hazard, whose box is returned).
fn paint_stack(cv: &mut Canvas, rng: &mut ChaCha8Rng, at: Spot, tall: bool) -> Option<BBox> {
    let Spot { cx, base, u, .. } = at;
    let levels = if tall {
        rng.random_range(6..=8)
    } else {
        rng.random_range(1..=3)
    };
    let bw = rng.random_range(34.0..46.0) * u;
    let bh = rng.random_range(15.0..19.0) * u;
    let c = jitter([185, 145, 95], rng, 20);
    let floor_y = base + 12.0 * u;
    cv.rect(
        cx - bw / 2.0 - 3.0 * u,
        floor_y - 5.0 * u,
        bw + 6.0 * u,
        5.0 * u,
        [150, 110, 60],
    );
    let lean = if tall {
        rng.random_range(-1.5..1.5) * u
    } else {
        0.0
    };
    let mut top = floor_y - 5.0 * u;
    let mut x0 = f32::MAX;
    let mut x1 = f32::MIN;
    for k in 0..levels {
        let x = cx - bw / 2.0 + lean * k as f32;
        top -= bh;
        cv.crate_box(x, top, bw, bh, jitter(c, rng, 8));
        x0 = x0.min(x);
        x1 = x1.max(x + bw);
    }
    tall.then_some([
        (x0 - 3.0 * u) as f64,
        top as f64,
        (x1 + 3.0 * u) as f64,
        floor_y as f64,
    ])
}

/// Boxes piled in front of an exit or extinguisher; returns their box.
fn blocking_pile(cv: &mut Canvas, rng: &mut ChaCha8Rng, cx: f32, floor: f32, u: f32) -> BBox {
    let n = rng.random_range(2..=4);
    let mut bb: Option<BBox> = None;
    for k in 0..n {
        let bw = rng.random_range(20.0..30.0) * u;
        let bh = rng.random_range(14.0..22.0) * u;
        let x = cx - 28.0 * u + (k % 2) as f32 * 22.0 * u + rng.random_range(-4.0..4.0) * u;
        let y = floor - bh - (k / 2) as f32 * 16.0 * u;
        let c = jitter([175, 135, 85], rng, 25);
        cv.crate_box(x, y, bw, bh, c);
        let b = [x as f64, y as f64, (x + bw) as f64, (y + bh) as f64];
        bb = Some(bb.map_or(b, |a| union(a, b)));
    }
    bb.expect("n ≥ 2")
}

/// One piece of debris lying on the floor at (x, y); returns its box.
fn debris(cv: &mut Canvas, rng: &mut ChaCha8Rng, x: f32, y: f32, u: f32) -> BBox {
    let colors: [Rgb; 4] = [[230, 110, 20], [40, 40, 45], [30, 90, 200], [200, 200, 60]];
    let c = jitter(*colors.choose(rng).unwrap(), rng, 15);
    match rng.random_range(0..3) {
        0 => {
            // A pipe or plank.
            let len = rng.random_range(30.0..50.0) * u;
            let dy = rng.random_range(-8.0..8.0) * u;
            cv.line(
                &[(x, y), (x + len, y + dy)],
                7.0 * u,
                c,
                Transform::identity(),
            );
            [
                (x - 4.0 * u) as f64,
                (y.min(y + dy) - 4.0 * u) as f64,
                (x + len + 4.0 * u) as f64,
                (y.max(y + dy) + 4.0 * u) as f64,
            ]
        }
        1 => {
            // A toolbox with a handle.
            let (bw, bh) = (
                rng.random_range(20.0..28.0) * u,
                rng.random_range(12.0..16.0) * u,
            );
            cv.rect(x, y - bh, bw, bh, c);
            cv.rect(x, y - bh, bw, 3.0 * u, shade(c, 0.6));
            cv.line(
                &[
                    (x + bw * 0.3, y - bh),
                    (x + bw * 0.5, y - bh - 5.0 * u),
                    (x + bw * 0.7, y - bh),
                ],
                2.0 * u,
                [30, 30, 30],
                Transform::identity(),
            );
            [
                x as f64,
                (y - bh - 6.0 * u) as f64,
                (x + bw) as f64,
                y as f64,
            ]
        }
        _ => {
            // A loose box or scrap.
            let (bw, bh) = (
                rng.random_range(16.0..24.0) * u,
                rng.random_range(11.0..16.0) * u,
            );
            cv.crate_box(x, y - bh, bw, bh, jitter([170, 120, 70], rng, 30));
            [x as f64, (y - bh) as f64, (x + bw) as f64, y as f64]
        }
    }
}

/// Tools lying on a workbench top.
fn draw_tools(cv: &mut Canvas, rng: &mut ChaCha8Rng, x: f32, y: f32, w: f32, u: f32) {
    let mut tx = x;
    while tx < x + w - 14.0 * u {
        let len = rng.random_range(10.0..16.0) * u;
        cv.line(
            &[(tx, y - 2.0 * u), (tx + len, y - 3.0 * u)],
            3.0 * u,
            [90, 90, 100],
            Transform::identity(),
        );
        tx += len + 6.0 * u;
    }
}

/// The name scene `index` has in a dataset: `images/00042.png`.
pub fn scene_name(index: u64) -> String {
    format!("images/{index:05}.png")
}

/// The index a [`scene_name`] stands for.
pub fn scene_index(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("images/")?.strip_suffix(".png")?;
    (digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Writes `n` scenes of `seed` to `out/images/NNNNN.png` and `out/annotations.jsonl` (atomically:
/// each file through a temporary file and a rename). `progress` is called after each image.
pub fn write_dataset(
    out: &Path,
    config: &SynthConfig,
    seed: u64,
    n: u64,
    progress: impl Fn() + Sync,
) -> anyhow::Result<PathBuf> {
    let images = out.join("images");
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let records: Vec<Annotation> = (0..n)
        .into_par_iter()
        .map(|i| -> anyhow::Result<Annotation> {
            let scene = render(config, seed, i);
            let name = scene_name(i);
            let path = out.join(&name);
            let mut png = Vec::new();
            scene
                .image
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .with_context(|| format!("cannot encode {}", path.display()))?;
            inspector_dataset::write_atomic(&path, &png)?;
            progress();
            Ok(Annotation {
                image: name,
                violations: scene.violations,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let file = out.join("annotations.jsonl");
    let mut text = Vec::new();
    for r in &records {
        serde_json::to_writer(&mut text, r)?;
        text.write_all(b"\n")?;
    }
    inspector_dataset::write_atomic(&file, &text)?;
    Ok(file)
}
