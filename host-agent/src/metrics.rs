//! Prometheus metrics of the host agent: per VM (connected, generations,
//! last success, failures by kind, rotation latency) and fleet totals.
//!
//! Two kinds of figures. Events (failures, rotation latencies, the last
//! success) are counted here as the VM tasks report them, through the
//! process-wide [`global`] handle, so a VM task needs one call per event
//! and nothing else. States (connected, generations, credential states)
//! are read from the same `VmStatus` snapshots `status` shows, at render
//! time, so the two can never disagree.
//!
//! Labels are bounded: `vm` is a name from the host's config (validated at
//! load: 1-64 characters of `A-Z a-z 0-9 - _ . @`), never anything a guest
//! said, and entries of VMs that left the config are dropped at reload
//! ([`Metrics::retain`]); every other label is an enum. Label values are
//! escaped all the same (see [`Label`]). Nothing a guest sends becomes a
//! label, and no error text is exported.
//!
//! The output is the Prometheus text format (0.0.4), which both a scrape
//! and node-exporter's textfile collector read: `prometheus-client`
//! encodes OpenMetrics, and [`to_prometheus_text`] makes the two small
//! differences (counter family names, the `# EOF` line) match.

pub mod export;

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::{CredState, VmStatus};

/// Why a VM was not (or not fully) brought in sync. One label value each;
/// each is counted when it happens (a source problem when it starts, not
/// on every poll while it lasts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// A dial failed or timed out: nothing answered.
    Unreachable,
    /// The guest refused the host key.
    KeyRefused,
    /// The host refused the guest: it did not return the VM's launch key.
    LaunchKeyRefused,
    /// A connection broke after it was set up (a call failed or timed out).
    SessionLost,
    /// A credential's source went missing.
    SourceMissing,
    /// A credential's source became unreadable (or timed out).
    SourceError,
    /// The guest's store stayed busy through every retry (ABORTED).
    GuestBusy,
    /// The guest refused a generation as not newer (FAILED_PRECONDITION).
    NotNewer,
    /// The guest refused a push as breaking its rules (INVALID_ARGUMENT and
    /// the like); nothing applied.
    PushRefused,
    /// The guest applied the push but reported one credential as failed.
    CredentialRefused,
    /// A unit action (restart, reload) failed in the guest.
    UnitFailed,
    /// No generation could be issued (the state directory).
    GenerationStore,
}

impl FailureKind {
    pub const ALL: [FailureKind; 12] = [
        FailureKind::Unreachable,
        FailureKind::KeyRefused,
        FailureKind::LaunchKeyRefused,
        FailureKind::SessionLost,
        FailureKind::SourceMissing,
        FailureKind::SourceError,
        FailureKind::GuestBusy,
        FailureKind::NotNewer,
        FailureKind::PushRefused,
        FailureKind::CredentialRefused,
        FailureKind::UnitFailed,
        FailureKind::GenerationStore,
    ];

    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Unreachable => "unreachable",
            FailureKind::KeyRefused => "key_refused",
            FailureKind::LaunchKeyRefused => "launch_key_refused",
            FailureKind::SessionLost => "session_lost",
            FailureKind::SourceMissing => "source_missing",
            FailureKind::SourceError => "source_error",
            FailureKind::GuestBusy => "guest_busy",
            FailureKind::NotNewer => "not_newer",
            FailureKind::PushRefused => "push_refused",
            FailureKind::CredentialRefused => "credential_refused",
            FailureKind::UnitFailed => "unit_failed",
            FailureKind::GenerationStore => "generation_store",
        }
    }

    fn index(self) -> usize {
        FailureKind::ALL
            .iter()
            .position(|k| *k == self)
            .unwrap_or_default()
    }
}

/// Upper bounds (seconds) of the rotation latency histogram: a push on a
/// local socket takes about a millisecond, one that waits on a busy guest
/// or a slow source up to the RPC timeout.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The counter families, whose names [`to_prometheus_text`] adjusts.
const COUNTERS: [&str; 2] = ["vmcred_vm_failures", "vmcred_failures"];

/// A latency histogram: a count per bucket (not cumulative; the last is
/// `+Inf`), their sum and count.
#[derive(Debug, Clone, Default)]
struct Latency {
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Latency {
    fn observe(&mut self, secs: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    fn add(&mut self, other: &Latency) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// Writes it as the histogram `m` stands for.
    fn encode(&self, mut m: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds.zip(self.buckets).collect();
        m.encode_histogram::<NoLabelSet>(self.sum, self.count, &buckets, None)
    }
}

/// What is counted per VM.
#[derive(Debug, Clone, Default)]
struct VmCounters {
    failures: [u64; FailureKind::ALL.len()],
    latency: Latency,
    last_success: Option<f64>,
}

/// The counted events of every configured VM.
#[derive(Debug, Default)]
pub struct Metrics {
    vms: Mutex<BTreeMap<String, VmCounters>>,
}

/// The agent's one set of metrics (VM tasks report to it).
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    fn with(&self, vm: &str, f: impl FnOnce(&mut VmCounters)) {
        let mut vms = match self.vms.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        match vms.get_mut(vm) {
            Some(c) => f(c),
            None => {
                let mut c = VmCounters::default();
                f(&mut c);
                vms.insert(vm.to_string(), c);
            }
        }
    }

    /// Counts one failure of `kind` for `vm`.
    pub fn failure(&self, vm: &str, kind: FailureKind) {
        self.with(vm, |c| c.failures[kind.index()] += 1);
    }

    /// A push the guest applied: its latency from reading the sources to
    /// the guest's acknowledgement.
    pub fn rotated(&self, vm: &str, took: Duration) {
        self.with(vm, |c| c.latency.observe(took.as_secs_f64()));
    }

    /// A sync that left the guest fully in sync, at `at`.
    pub fn succeeded(&self, vm: &str, at: SystemTime) {
        let secs = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.with(vm, |c| c.last_success = Some(secs));
    }

    /// Drops the entries of VMs for which `keep` is false (they left the
    /// config), so label sets stay those of configured VMs.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut vms = match self.vms.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        vms.retain(|name, _| keep(name));
    }

    /// The exposition for these VM states (one per configured VM), in the
    /// Prometheus text format.
    pub fn render(&self, statuses: Vec<VmStatus>) -> String {
        let counters = match self.vms.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot { statuses, counters }));
        let mut out = String::new();
        // Writing into a String fails only if an encoder reports an error,
        // which ours do only for a value out of range (clamped below).
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        to_prometheus_text(&out)
    }
}

/// A label value, escaped as the text format requires (`\\`, `\"`,
/// `\n`); VM names cannot hold these, but the escaping does not rely on
/// that.
#[derive(Debug, Clone)]
pub struct Label<'a>(pub &'a str);

impl EncodeLabelValue for Label<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        for ch in self.0.chars() {
            match ch {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// One render's data.
#[derive(Debug)]
struct Snapshot {
    statuses: Vec<VmStatus>,
    counters: BTreeMap<String, VmCounters>,
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Snapshot {
    fn gauge(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&VmStatus) -> Option<i64>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for s in &self.statuses {
            if let Some(v) = value(s) {
                let labels = [("vm", Label(&s.vm))];
                ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        ConstGauge::new(self.statuses.len() as i64).encode(enc.encode_descriptor(
            "vmcred_vms",
            "VMs in the host agent's config.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.statuses.iter().filter(|s| s.connected).count() as i64).encode(
            enc.encode_descriptor(
                "vmcred_vms_connected",
                "VMs with a live session to their guest agent.",
                None,
                MetricType::Gauge,
            )?,
        )?;
        self.gauge(
            &mut enc,
            "vmcred_vm_connected",
            "1 while the host has a live session to the VM's guest agent.",
            |s| Some(i64::from(s.connected)),
        )?;
        self.gauge(
            &mut enc,
            "vmcred_vm_generation_sent",
            "The last generation the host issued for the VM (microseconds since the epoch, or higher).",
            |s| Some(clamp(s.generation_sent)),
        )?;
        self.gauge(
            &mut enc,
            "vmcred_vm_generation_applied_claimed",
            "The generation the guest says it applied: a claim by the guest, never adopted by the host.",
            |s| Some(clamp(s.generation_applied)),
        )?;
        self.gauge(
            &mut enc,
            "vmcred_vm_owed_units",
            "Unit actions the guest says it still owes (failed, retried by the guest).",
            |s| Some(s.owed_units.len() as i64),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vmcred_vm_last_success_timestamp_seconds",
                "When a sync last left the VM fully in sync (seconds since the epoch); absent until the first.",
                None,
                MetricType::Gauge,
            )?;
            for s in &self.statuses {
                if let Some(t) = self.counters.get(&s.vm).and_then(|c| c.last_success) {
                    let labels = [("vm", Label(&s.vm))];
                    ConstGauge::new(t).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "vmcred_vm_credentials",
                "The VM's configured credentials by state (as `status` shows them).",
                None,
                MetricType::Gauge,
            )?;
            for s in &self.statuses {
                for state in CredState::ALL {
                    if state == CredState::Omitted {
                        continue;
                    }
                    let n = s.credentials.iter().filter(|c| c.state == state).count();
                    let labels = [("vm", Label(&s.vm)), ("state", Label(state.as_str()))];
                    ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let configured = |name: &str| self.statuses.iter().any(|s| s.vm == name);
        {
            let mut m = enc.encode_descriptor(
                "vmcred_vm_failures",
                "Failures by kind per VM, counted when they happen.",
                None,
                MetricType::Counter,
            )?;
            for s in &self.statuses {
                let counts = self.counters.get(&s.vm).map(|c| c.failures);
                for kind in FailureKind::ALL {
                    let n = counts.map(|c| c[kind.index()]).unwrap_or(0);
                    let labels = [("vm", Label(&s.vm)), ("kind", Label(kind.as_str()))];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "vmcred_failures",
                "Failures by kind, all configured VMs together.",
                None,
                MetricType::Counter,
            )?;
            for kind in FailureKind::ALL {
                let n: u64 = self
                    .counters
                    .iter()
                    .filter(|(name, _)| configured(name))
                    .map(|(_, c)| c.failures[kind.index()])
                    .sum();
                let labels = [("kind", Label(kind.as_str()))];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "vmcred_vm_rotation_seconds",
                "Time from reading the sources to the guest's acknowledgement, per applied push.",
                None,
                MetricType::Histogram,
            )?;
            let empty = Latency::default();
            for s in &self.statuses {
                let h = self
                    .counters
                    .get(&s.vm)
                    .map(|c| &c.latency)
                    .unwrap_or(&empty);
                let labels = [("vm", Label(&s.vm))];
                h.encode(m.encode_family(&labels)?)?;
            }
        }
        let mut fleet = Latency::default();
        for (_, c) in self.counters.iter().filter(|(n, _)| configured(n)) {
            fleet.add(&c.latency);
        }
        fleet.encode(enc.encode_descriptor(
            "vmcred_rotation_seconds",
            "Time from reading the sources to the guest's acknowledgement, all VMs together.",
            None,
            MetricType::Histogram,
        )?)?;
        Ok(())
    }
}

/// OpenMetrics text as `prometheus-client` writes it, made into the
/// Prometheus text format 0.0.4: a counter's `# HELP`/`# TYPE` name the
/// sample name (`…_total`) and the `# EOF` line goes. Histograms and gauges
/// are the same in both.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let mut renamed = None;
        for c in COUNTERS {
            for head in ["# HELP ", "# TYPE "] {
                if let Some(rest) = line.strip_prefix(head) {
                    if let Some(tail) = rest.strip_prefix(c).filter(|t| t.starts_with(' ')) {
                        renamed = Some(format!("{head}{c}_total{tail}"));
                    }
                }
            }
        }
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(vm: &str, connected: bool) -> VmStatus {
        VmStatus {
            vm: vm.into(),
            connected,
            generation_sent: 1_700_000_000_000_000,
            generation_applied: u64::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn labels_are_escaped_and_counters_named_for_the_text_format() {
        let m = Metrics::default();
        let odd = "a\"b\\c\nd";
        m.failure(odd, FailureKind::GuestBusy);
        m.failure(odd, FailureKind::GuestBusy);
        m.rotated(odd, Duration::from_millis(3));
        let text = m.render(vec![status(odd, true)]);
        assert!(
            text.contains(r#"vmcred_vm_failures_total{vm="a\"b\\c\nd",kind="guest_busy"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE vmcred_vm_failures_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE vmcred_failures_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        // A claim of u64::MAX cannot break the output: clamped.
        assert!(
            text.contains(&format!(
                r#"vmcred_vm_generation_applied_claimed{{vm="a\"b\\c\nd"}} {}"#,
                i64::MAX
            )),
            "{text}"
        );
        assert!(
            text.contains(r#"vmcred_vm_rotation_seconds_bucket{le="0.005",vm="a\"b\\c\nd"} 1"#),
            "{text}"
        );
        assert!(text.contains("vmcred_rotation_seconds_count 1\n"), "{text}");
    }

    #[test]
    fn vms_that_left_the_config_leave_the_output() {
        let m = Metrics::default();
        m.failure("gone", FailureKind::Unreachable);
        m.failure("kept", FailureKind::Unreachable);
        // Not configured any more: not in the fleet total either.
        let text = m.render(vec![status("kept", false)]);
        assert!(
            text.contains("vmcred_failures_total{kind=\"unreachable\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("\"gone\""), "{text}");
        m.retain(|n| n == "kept");
        assert_eq!(m.vms.lock().unwrap().len(), 1);
    }

    #[test]
    fn latency_buckets_are_counted_once_each() {
        let mut l = Latency::default();
        for s in [0.0005, 0.001, 0.02, 100.0] {
            l.observe(s);
        }
        assert_eq!(l.buckets[0], 2, "le is inclusive");
        assert_eq!(l.buckets[4], 1);
        assert_eq!(l.buckets[LATENCY_BUCKETS.len()], 1, "+Inf");
        assert_eq!(l.count, 4);
    }
}
