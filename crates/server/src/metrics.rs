//! Prometheus metrics (`GET /metrics`): requests and latency by route, queue depth, batch
//! sizes, cache hits, cancelled and refused jobs, inspections by status and violations by risk,
//! and with `serve --cameras` each camera's frames, events, reconnects, status and latency.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route pattern (`/api/v1/inspections/{id}`), never the raw path.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RiskLabels {
    pub risk: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CameraLabels {
    pub camera: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CameraFrameLabels {
    pub camera: String,
    /// `read`, `inspected`, `repeated` (by the change gate) or `dropped`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CameraQuantileLabels {
    pub camera: String,
    pub quantile: String,
}

/// The cameras of `serve --cameras`, set from each round's published state.
pub struct CameraMetrics {
    pub frames: Family<CameraFrameLabels, Gauge>,
    pub events: Family<CameraLabels, Gauge>,
    pub reconnects: Family<CameraLabels, Gauge>,
    /// 1 while the camera is up, 0 while it is down, ended or failed.
    pub up: Family<CameraLabels, Gauge>,
    pub latency: Family<CameraQuantileLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub queue_depth: Gauge,
    pub batch_size: Histogram,
    pub cache_hits: Counter,
    pub cancelled: Counter,
    pub queue_full: Counter,
    pub inspections: Family<StatusLabels, Counter>,
    pub violations: Family<RiskLabels, Counter>,
    pub cameras: CameraMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("inspector");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ])
        });
        let queue_depth = Gauge::default();
        let batch_size = Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]);
        let cache_hits = Counter::default();
        let cancelled = Counter::default();
        let queue_full = Counter::default();
        let inspections = Family::<StatusLabels, Counter>::default();
        let violations = Family::<RiskLabels, Counter>::default();
        let cameras = CameraMetrics {
            frames: Family::default(),
            events: Family::default(),
            reconnects: Family::default(),
            up: Family::default(),
            latency: Family::default(),
        };
        registry.register(
            "camera_frames",
            "Frames of each camera (serve --cameras) by kind: read, inspected, repeated, dropped",
            cameras.frames.clone(),
        );
        registry.register(
            "camera_events",
            "Alert events raised by each camera",
            cameras.events.clone(),
        );
        registry.register(
            "camera_reconnects",
            "Outages of each camera's stream",
            cameras.reconnects.clone(),
        );
        registry.register(
            "camera_up",
            "1 while the camera is up, 0 otherwise",
            cameras.up.clone(),
        );
        registry.register(
            "camera_event_latency_seconds",
            "Frame-to-event latency of each camera's events, by quantile",
            cameras.latency.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        registry.register(
            "queue_depth",
            "Inference jobs waiting for the model",
            queue_depth.clone(),
        );
        registry.register(
            "batch_size",
            "Photos per model batch (micro-batching)",
            batch_size.clone(),
        );
        registry.register(
            "cache_hits",
            "Inspections answered from the answer cache",
            cache_hits.clone(),
        );
        registry.register(
            "cancelled_jobs",
            "Jobs dropped before they ran because the client left or timed out",
            cancelled.clone(),
        );
        registry.register(
            "queue_full",
            "Requests refused with 503 because the queue was full",
            queue_full.clone(),
        );
        registry.register(
            "inspections",
            "Inspections stored, by status",
            inspections.clone(),
        );
        registry.register(
            "violations",
            "Violations found, by risk",
            violations.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            queue_depth,
            batch_size,
            cache_hits,
            cancelled,
            queue_full,
            inspections,
            violations,
            cameras,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
