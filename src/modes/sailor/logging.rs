//! Bunyan JSON lines on stdout, the format sailor-nodejs logs in (`lib/logging.js`).
//!
//! The platform's executions page and log shipping parse these lines, so the shape is bunyan's:
//! `name`, `hostname`, `pid`, the `ELASTICIO_*` context and `tag`, `level` as a number, the
//! span and event fields, `msg`, `time`, `v: 0`. Span fields are stamped on every line logged
//! inside the span, which is how `threadId`/`messageId`/`parentMessageId` reach component logs.

use serde_json::Value;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Events from the runtime itself log as `"sailor"`, everything else as `"component"`, the way
/// sailor separates its own logger from the one it hands the component.
const SAILOR_TARGET: &str = "chatgpt_component::modes::sailor";

/// Written by the layer itself; a span or event field of the same name is dropped rather than
/// allowed to corrupt what bunyan readers rely on.
const RESERVED: [&str; 7] = ["name", "hostname", "pid", "level", "msg", "time", "v"];

/// Dependencies whose debug output would drown the step's own lines.
const NOISY: [&str; 6] = ["lapin", "amq_protocol", "hyper", "reqwest", "rustls", "h2"];

/// A `tracing` layer writing one bunyan JSON object per event to `W`.
pub struct BunyanLayer<W> {
    writer: W,
    hostname: String,
    pid: u32,
    /// Context pairs as written, followed by `tag` when the flow id is known.
    context: Vec<(String, Value)>,
}

impl<W> BunyanLayer<W> {
    /// `context` is stamped verbatim on every line (see `Settings::log_context`); its
    /// `ELASTICIO_FLOW_ID` also becomes `tag`, as in sailor.
    pub fn new(writer: W, context: Vec<(String, String)>) -> Self {
        let tag = context
            .iter()
            .find(|(key, _)| key == "ELASTICIO_FLOW_ID")
            .map(|(_, flow)| ("tag".to_owned(), Value::from(flow.as_str())));
        let context = context
            .into_iter()
            .map(|(key, value)| (key, Value::from(value)))
            .chain(tag)
            .collect();
        BunyanLayer {
            writer,
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: std::process::id(),
            context,
        }
    }
}

/// Installs the bunyan layer on stdout as the global subscriber. `level` is `LOG_LEVEL` (see
/// [`level_filter`]). A second call keeps the first subscriber, so tests and early callers
/// cannot make it panic.
pub fn init(level: &str, context: Vec<(String, String)>) {
    let _ = tracing_subscriber::registry()
        .with(filter(level))
        .with(BunyanLayer::new(std::io::stdout, context))
        .try_init();
}

/// The global filter: `level` for everything, but no chattier than `warn` for the noisy crates (`NOISY`).
pub fn filter(level: &str) -> EnvFilter {
    let level = level_filter(level);
    let noisy = level.min(LevelFilter::WARN);
    let mut directives = level.to_string();
    for target in NOISY {
        directives.push_str(&format!(",{target}={noisy}"));
    }
    EnvFilter::new(directives)
}

/// Bunyan's `LOG_LEVEL`: a name (`fatal` maps to `error`, as nothing in `tracing` is fatal) or a
/// number (above 60 turns logging off, sailor's own trick). Unset or unknown means `info`.
pub fn level_filter(level: &str) -> LevelFilter {
    let level = level.trim().to_ascii_lowercase();
    if let Ok(n) = level.parse::<u32>() {
        return match n {
            0..=10 => LevelFilter::TRACE,
            11..=20 => LevelFilter::DEBUG,
            21..=30 => LevelFilter::INFO,
            31..=40 => LevelFilter::WARN,
            41..=60 => LevelFilter::ERROR,
            _ => LevelFilter::OFF,
        };
    }
    match level.as_str() {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "warn" => LevelFilter::WARN,
        "error" | "fatal" => LevelFilter::ERROR,
        _ => LevelFilter::INFO,
    }
}

/// Ordered JSON fields; a later value for a key replaces the earlier one in place, so lines never
/// carry duplicate keys.
#[derive(Default)]
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn set(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
    }

    fn merge(&mut self, other: &Fields) {
        for (key, value) in &other.0 {
            if !RESERVED.contains(&key.as_str()) {
                self.set(key, value.clone());
            }
        }
    }

    /// Serialised by hand because `serde_json::Map` sorts its keys, and bunyan's order (`name`
    /// first, `msg`/`time`/`v` last) makes raw lines easier to read.
    fn to_json_line(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(256);
        buf.push(b'{');
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            // Writing a string or a `Value` into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut buf, key);
            buf.push(b':');
            let _ = serde_json::to_writer(&mut buf, value);
        }
        buf.extend_from_slice(b"}\n");
        buf
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        let at = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(at).1)
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field.name(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set(field.name(), Value::from(value));
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let json = i64::try_from(value).map_or_else(|_| value.to_string().into(), Value::from);
        self.set(field.name(), json);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let json = u64::try_from(value).map_or_else(|_| value.to_string().into(), Value::from);
        self.set(field.name(), json);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; a string keeps the line parseable.
        let json = serde_json::Number::from_f64(value)
            .map_or_else(|| value.to_string().into(), Value::Number);
        self.set(field.name(), json);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field.name(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.set(field.name(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `log`-crate records bridged by tracing-log carry their origin as `log.*` fields; bunyan
        // lines have no use for them.
        if !field.name().starts_with("log.") {
            self.set(field.name(), Value::from(format!("{value:?}")));
        }
    }
}

/// The fields recorded on a span, kept in its extensions until it closes.
struct SpanFields(Fields);

impl<S, W> Layer<S> for BunyanLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        span.extensions_mut().replace(SpanFields(fields));
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let name = if meta.target().starts_with(SAILOR_TARGET) {
            "sailor"
        } else {
            "component"
        };
        let mut line = Fields::default();
        line.set("name", name.into());
        line.set("hostname", self.hostname.as_str().into());
        line.set("pid", self.pid.into());
        for (key, value) in &self.context {
            line.set(key, value.clone());
        }
        line.set("level", bunyan_level(*meta.level()).into());
        // Outermost span first, so an inner span's field wins over an outer one's.
        for span in ctx
            .event_scope(event)
            .into_iter()
            .flat_map(|scope| scope.from_root())
        {
            if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                line.merge(fields);
            }
        }
        let mut own = Fields::default();
        event.record(&mut own);
        let msg = own.take("message").unwrap_or_else(|| "".into());
        line.merge(&own);
        line.set("msg", msg);
        line.set("time", format_time(SystemTime::now()).into());
        line.set("v", 0.into());

        // One write per line keeps lines whole when threads log at once; a failed write to
        // stdout has nowhere better to be reported.
        let _ = self
            .writer
            .make_writer_for(meta)
            .write_all(&line.to_json_line());
    }
}

fn bunyan_level(level: Level) -> u8 {
    match level {
        Level::TRACE => 10,
        Level::DEBUG => 20,
        Level::INFO => 30,
        Level::WARN => 40,
        Level::ERROR => 50,
    }
}

/// ISO-8601 UTC with milliseconds (`2024-01-01T00:00:00.000Z`), bunyan's `time`.
pub fn format_time(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing::{debug, error, info, info_span, trace, warn};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    fn context() -> Vec<(String, String)> {
        [
            ("ELASTICIO_FLOW_ID", "flow1"),
            ("ELASTICIO_STEP_ID", "step_1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec()
    }

    /// Runs `f` under a bunyan layer (behind `filter`, if given) and returns what it wrote.
    fn capture_raw(filter: Option<EnvFilter>, f: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(BunyanLayer::new(buffer.clone(), context()));
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text
    }

    fn capture(filter: Option<EnvFilter>, f: impl FnOnce()) -> Vec<Value> {
        let text = capture_raw(filter, f);
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn is_bunyan_time(t: &str) -> bool {
        let shape = "dddd-dd-ddTdd:dd:dd.dddZ";
        t.len() == shape.len()
            && t.chars().zip(shape.chars()).all(|(c, s)| match s {
                'd' => c.is_ascii_digit(),
                _ => c == s,
            })
    }

    #[test]
    fn writes_a_bunyan_record_with_context_and_typed_fields() {
        let lines = capture(None, || {
            let err = std::io::Error::other("boom");
            info!(count = 3, ratio = 0.5, ok = true, who = "me", list = ?vec![1, 2], err = &err as &dyn std::error::Error, "hello {}", "world");
        });
        let line = &lines[0];
        assert_eq!(line["name"], "sailor");
        assert_eq!(
            line["hostname"],
            gethostname::gethostname().to_string_lossy().as_ref()
        );
        assert_eq!(line["pid"], std::process::id());
        assert_eq!(
            (line["level"].as_u64(), line["v"].as_u64()),
            (Some(30), Some(0))
        );
        assert_eq!(line["msg"], "hello world");
        assert!(
            is_bunyan_time(line["time"].as_str().unwrap()),
            "{}",
            line["time"]
        );
        assert_eq!(
            (&line["tag"], &line["ELASTICIO_FLOW_ID"]),
            (&"flow1".into(), &"flow1".into())
        );
        assert_eq!(line["ELASTICIO_STEP_ID"], "step_1");
        assert_eq!(
            (&line["count"], &line["ratio"], &line["ok"]),
            (&3.into(), &0.5.into(), &true.into())
        );
        assert_eq!(
            (&line["who"], &line["list"], &line["err"]),
            (&"me".into(), &"[1, 2]".into(), &"boom".into())
        );
        assert!(line.get("message").is_none());
    }

    #[test]
    fn span_fields_reach_every_line_inside_the_span() {
        let lines = capture(None, || {
            let outer = info_span!(
                "message",
                threadId = "t1",
                messageId = tracing::field::Empty
            );
            outer.record("messageId", "m1");
            let _outer = outer.enter();
            info!(target: "chatgpt_component::actions::send_request", "from the component");
            let inner = info_span!("retry", messageId = "m2", parentMessageId = "p1");
            inner.in_scope(|| warn!("inner"));
        });
        assert_eq!(lines[0]["name"], "component");
        assert_eq!(
            (&lines[0]["threadId"], &lines[0]["messageId"]),
            (&"t1".into(), &"m1".into())
        );
        assert!(lines[0].get("parentMessageId").is_none());
        assert_eq!(
            (&lines[1]["threadId"], &lines[1]["messageId"]),
            (&"t1".into(), &"m2".into())
        );
        assert_eq!(lines[1]["parentMessageId"], "p1");
    }

    #[test]
    fn reserved_fields_cannot_be_overridden_and_keys_are_not_duplicated() {
        let raw = capture_raw(None, || {
            let span = info_span!("s", tag = "span-tag", level = "loud");
            span.in_scope(|| info!(name = "spoof", v = 9, "m"));
        });
        for key in ["name", "level", "v", "tag"] {
            assert_eq!(
                raw.matches(&format!("\"{key}\":")).count(),
                1,
                "{key} in {raw}"
            );
        }
        let line: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(
            (&line["name"], &line["level"], &line["v"]),
            (&"sailor".into(), &30.into(), &0.into())
        );
        assert_eq!(
            line["tag"], "span-tag",
            "context fields may be refined by spans"
        );
    }

    #[test]
    fn levels_are_bunyan_numbers() {
        let lines = capture(None, || {
            trace!("t");
            debug!("d");
            info!("i");
            warn!("w");
            error!("e");
        });
        let levels: Vec<u64> = lines.iter().map(|l| l["level"].as_u64().unwrap()).collect();
        assert_eq!(levels, [10, 20, 30, 40, 50]);
    }

    #[test]
    fn lines_keep_bunyan_key_order() {
        let text = capture_raw(None, || info!(x = 1, "m"));
        assert!(
            text.starts_with("{\"name\":\"sailor\",\"hostname\":"),
            "{text}"
        );
        let middle = "\"tag\":\"flow1\",\"level\":30,\"x\":1,\"msg\":\"m\",\"time\":";
        assert!(text.contains(middle), "{text}");
        assert!(text.ends_with(",\"v\":0}\n"), "{text}");
    }

    #[test]
    fn log_level_names_and_numbers() {
        let cases = [
            ("trace", LevelFilter::TRACE),
            ("DEBUG", LevelFilter::DEBUG),
            ("", LevelFilter::INFO),
            ("bogus", LevelFilter::INFO),
            ("warn", LevelFilter::WARN),
            ("fatal", LevelFilter::ERROR),
            ("20", LevelFilter::DEBUG),
            ("30", LevelFilter::INFO),
            ("60", LevelFilter::ERROR),
            ("61", LevelFilter::OFF),
        ];
        for (name, expected) in cases {
            assert_eq!(level_filter(name), expected, "{name:?}");
        }
    }

    #[test]
    fn filter_quiets_noisy_crates_below_warn() {
        let lines = capture(Some(filter("debug")), || {
            debug!(target: "lapin::channel", "noise");
            warn!(target: "hyper_util::client", "kept");
            debug!(target: "chatgpt_component::actions", "kept too");
            trace!("dropped");
        });
        let msgs: Vec<&str> = lines.iter().map(|l| l["msg"].as_str().unwrap()).collect();
        assert_eq!(msgs, ["kept", "kept too"]);
        let lines = capture(Some(filter("error")), || warn!(target: "lapin", "dropped"));
        assert!(lines.is_empty());
    }

    #[test]
    fn time_is_iso_8601_utc_with_milliseconds() {
        let at = |ms: u64| format_time(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_704_067_200_123), "2024-01-01T00:00:00.123Z");
        assert_eq!(
            at(1_709_164_800_000 + 86_399_999),
            "2024-02-29T23:59:59.999Z"
        );
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
        assert!(is_bunyan_time(&format_time(SystemTime::now())));
    }
}
