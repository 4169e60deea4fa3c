//! A private RabbitMQ node per test (or per test file), plus AMQP helpers built on lapin.
//!
//! Each [`Rabbit`] runs `/usr/lib/rabbitmq/bin/rabbitmq-server` (the real script, not the
//! `/usr/sbin` wrapper, which would `su` to the `rabbitmq` user) as a child, with everything
//! private to it:
//!
//! * a temp directory (`$TMPDIR/cgc-rabbit-<pid>-<n>-<random>`) holding `HOME` (and the Erlang
//!   cookie), the Mnesia directory, logs, an empty plugin list, `rabbitmq.conf` and an empty
//!   `rabbitmq-env.conf`, so nothing under `/etc/rabbitmq` or `/var/lib/rabbitmq` is used;
//! * three free loopback ports: AMQP, Erlang distribution, and a **private epmd**
//!   (`ERL_EPMD_PORT`, `ERL_EPMD_ADDRESS=127.0.0.1`). RabbitMQ 3.10 always starts an epmd
//!   itself, so rather than share the system one on 4369 each node gets its own, which is
//!   killed when the node stops; nodes therefore never see each other;
//! * a unique node name `cgc-<pid>-<n>@localhost`.
//!
//! Everything listens on 127.0.0.1 only (the distribution listener via
//! `-kernel inet_dist_use_interface`, passed in `ERL_FLAGS`).
//!
//! The node is wrapped in a small `sh` watchdog that owns the process group. Its stdin is a pipe
//! from the test process: the harness writes `stop` to it for an orderly stop (SIGTERM, which
//! RabbitMQ handles as a clean shutdown, so durable queues and persistent messages survive); if
//! the test process dies without dropping the [`Rabbit`] (a `static`, `SIGKILL`, abort), the pipe
//! closes, the watchdog stops the node and deletes the temp directory. Dropping a [`Rabbit`]
//! kills the process group outright (no need to be graceful: the data is deleted anyway).
//!
//! Every helper opens its own short-lived AMQP connection on the caller's runtime, so a
//! [`Rabbit`] can be shared between tests (e.g. in a `tokio::sync::OnceCell`) even though each
//! `#[tokio::test]` has its own runtime.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Map, Value};

/// The real server script of the Debian package (the `/usr/sbin` one re-executes itself as the
/// `rabbitmq` user). `CGC_RABBITMQ_SERVER` overrides it (e.g. a generic-unix or Homebrew
/// install); if neither exists, `rabbitmq-server` is looked up on `PATH`.
const DEBIAN_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

fn server_script() -> String {
    if let Some(path) = std::env::var_os("CGC_RABBITMQ_SERVER") {
        return path.to_string_lossy().into_owned();
    }
    if Path::new(DEBIAN_SERVER).exists() {
        return DEBIAN_SERVER.to_string();
    }
    "rabbitmq-server".to_string()
}
/// How long a node may take to accept AMQP connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an orderly stop may take before the process group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Start attempts (with fresh ports) when a node exits during start-up, e.g. a port was taken.
const START_ATTEMPTS: usize = 3;

/// The watchdog: runs the server, stops it when told (`stop` on stdin) or when stdin closes (the
/// test process is gone: then it also deletes the node's directory), and kills the private epmd
/// once the server has exited.
const WATCHDOG: &str = r#"
rm -f "$CGC_DIR/.orphaned"
exec 3<&0
"$CGC_SERVER" </dev/null &
srv=$!
(
  if read -r cmd <&3 && [ "$cmd" = stop ]; then :; else : > "$CGC_DIR/.orphaned"; fi
  kill -TERM "$srv" 2>/dev/null
) </dev/null &
exec 3<&-
wait "$srv"
status=$?
epmd -kill >/dev/null 2>&1
if [ -e "$CGC_DIR/.orphaned" ]; then rm -rf "$CGC_DIR"; fi
exit $status
"#;

static NODE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A free TCP port on 127.0.0.1 (bound, read and released; never handed out twice by one
/// process).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The ports a node uses; fixed for its lifetime (restarts reuse them).
#[derive(Clone, Copy, Debug)]
struct Ports {
    amqp: u16,
    dist: u16,
    epmd: u16,
}

impl Ports {
    fn fresh() -> Ports {
        Ports {
            amqp: free_port(),
            dist: free_port(),
            epmd: free_port(),
        }
    }
}

/// The running server: the watchdog shell (leader of its own process group) and its stdin.
struct Process {
    child: Child,
    stdin: Option<ChildStdin>,
}

struct Config {
    ports: Ports,
    node: String,
}

/// A private RabbitMQ node. See the module documentation.
pub struct Rabbit {
    dir: PathBuf,
    config: Mutex<Config>,
    process: Mutex<Option<Process>>,
}

impl Rabbit {
    /// Starts a private node and waits (up to 60 s) until it is ready: its log reports the
    /// listener on its port and "Server startup complete", and an AMQP connection succeeds.
    /// Typically 4–7 s. If the node exits during start-up (e.g. a port was taken meanwhile),
    /// it is retried with fresh ports, up to 3 times.
    ///
    /// Panics with the log paths (and their tails) if it cannot start.
    pub async fn start() -> Rabbit {
        let n = NODE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!(
            "cgc-rabbit-{pid}-{n}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(dir.join("log")).expect("create the node's temp dir");
        write_static_files(&dir);
        let rabbit = Rabbit {
            config: Mutex::new(Config {
                ports: Ports::fresh(),
                node: format!("cgc-{pid}-{n}@localhost"),
            }),
            dir,
            process: Mutex::new(None),
        };
        let mut attempt = 1;
        loop {
            match rabbit.launch().await {
                Ok(()) => return rabbit,
                Err(Failure::Exited(why)) if attempt < START_ATTEMPTS => {
                    // Most likely one of the ports was taken between `free_port` and the bind.
                    eprintln!(
                        "rabbit: node {} exited during start-up ({why}); retrying with new ports",
                        rabbit.node()
                    );
                    attempt += 1;
                    rabbit.config.lock().unwrap().ports = Ports::fresh();
                }
                Err(failure) => rabbit.fail(&failure),
            }
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port())
    }

    /// The AMQP port.
    pub fn port(&self) -> u16 {
        self.ports().amqp
    }

    /// The Erlang node name, e.g. `cgc-1234-0@localhost`.
    pub fn node(&self) -> String {
        self.config.lock().unwrap().node.clone()
    }

    /// The node's temp directory (`log/rabbit.log` is the server log, `log/console.log` its
    /// stdout/stderr).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log").join("rabbit.log")
    }

    /// Stops the node in an orderly way (process gone, port closed) and starts it again on the
    /// same ports and data directory, so durable queues and persistent messages survive; waits
    /// until it accepts connections. Clients see their connections closed.
    pub async fn restart(&self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Stops the node in an orderly way (SIGTERM: RabbitMQ closes connections and flushes its
    /// stores), for "broker down" tests; returns once the process is gone and the port closed.
    /// No-op if it is not running.
    pub async fn stop(&self) {
        let Some(mut process) = self.process.lock().unwrap().take() else {
            return;
        };
        tell_stop(&mut process);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if process.child.try_wait().ok().flatten().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if process.child.try_wait().ok().flatten().is_none() {
            eprintln!(
                "rabbit: node {} did not stop within {STOP_TIMEOUT:?}; killing it",
                self.node()
            );
            self.kill_process(process);
        }
        self.wait_port_closed().await;
    }

    /// Kills the node abruptly (SIGKILL to its process group), as a crash would; returns once
    /// the port is closed. Messages that were confirmed to a publisher survive a later
    /// [`start_again`](Self::start_again). No-op if it is not running.
    pub async fn kill(&self) {
        let process = self.process.lock().unwrap().take();
        if let Some(process) = process {
            self.kill_process(process);
        }
        self.wait_port_closed().await;
    }

    /// Starts the node again after [`stop`](Self::stop) or [`kill`](Self::kill), on the same
    /// ports and data; waits until it accepts connections. No-op if it is running.
    pub async fn start_again(&self) {
        if self.process.lock().unwrap().is_some() {
            return;
        }
        let mut attempt = 1;
        loop {
            match self.launch().await {
                Ok(()) => return,
                // The same ports must be reused: a just-closed port may still be busy briefly.
                Err(Failure::Exited(why)) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "rabbit: node {} exited during restart ({why}); retrying",
                        self.node()
                    );
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(failure) => self.fail(&failure),
            }
        }
    }

    /// Whether the node process is running (it may not accept connections yet).
    pub fn is_running(&self) -> bool {
        let mut guard = self.process.lock().unwrap();
        match guard.as_mut() {
            Some(process) => process.child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    fn ports(&self) -> Ports {
        self.config.lock().unwrap().ports
    }

    /// Spawns the watchdog and waits until the node accepts AMQP connections.
    async fn launch(&self) -> Result<(), Failure> {
        let (ports, node) = {
            let config = self.config.lock().unwrap();
            (config.ports, config.node.clone())
        };
        self.write_config(ports);
        let log_offset = std::fs::metadata(self.log_path())
            .map(|m| m.len())
            .unwrap_or(0);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log").join("console.log"))
            .expect("open console.log");
        let dir = self.dir.to_str().expect("temp dir path is UTF-8");
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("/bin/sh")
                .arg("-c")
                .arg(WATCHDOG)
                .env_clear()
                .envs(node_env(dir, ports, &node))
                .current_dir(&self.dir)
                .stdin(Stdio::piped())
                .stdout(console.try_clone().expect("dup console.log"))
                .stderr(console)
                .process_group(0)
                .spawn()
                .expect("spawn rabbitmq-server")
        };
        let mut process = Process { stdin: None, child };
        process.stdin = process.child.stdin.take();
        *self.process.lock().unwrap() = Some(process);

        let uri = self.amqp_uri();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let exited = {
                let mut guard = self.process.lock().unwrap();
                let process = guard.as_mut().expect("process slot");
                process.child.try_wait().ok().flatten()
            };
            if let Some(status) = exited {
                let process = self.process.lock().unwrap().take();
                if let Some(mut process) = process {
                    tell_stop(&mut process);
                }
                epmd_kill(ports.epmd);
                return Err(Failure::Exited(format!("watchdog {status}")));
            }
            // Only this launch's part of the log counts; it tells our node apart from anything
            // else that might have grabbed the port.
            let log = read_from(&self.log_path(), log_offset);
            if log.contains("BOOT FAILED") {
                let process = self.process.lock().unwrap().take();
                if let Some(process) = process {
                    self.kill_process(process);
                }
                return Err(Failure::Exited("BOOT FAILED".into()));
            }
            let listening = format!("started TCP listener on 127.0.0.1:{}", ports.amqp);
            if log.contains(&listening) && log.contains("Server startup complete") {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(5),
                    Connection::connect(&uri, ConnectionProperties::default()),
                )
                .await;
                if let Ok(Ok(connection)) = attempt {
                    let _ = connection.close(200, "ready".into()).await;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let process = self.process.lock().unwrap().take();
                if let Some(process) = process {
                    self.kill_process(process);
                }
                return Err(Failure::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn write_config(&self, ports: Ports) {
        // The listener also comes from RABBITMQ_NODE_IP_ADDRESS/PORT; the file keeps anything
        // under /etc/rabbitmq out and makes the node test-friendly.
        let conf = format!(
            "listeners.tcp.1 = 127.0.0.1:{}\n\
             log.console = false\n\
             log.file.level = info\n\
             disk_free_limit.absolute = 1MB\n\
             vm_memory_high_watermark.relative = 0.8\n",
            ports.amqp
        );
        std::fs::write(self.dir.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
    }

    /// Kills the process group and the private epmd, and reaps the watchdog.
    fn kill_process(&self, mut process: Process) {
        let pgid = process.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = process.child.kill();
        let _ = process.child.wait();
        drop(process.stdin.take());
        // The VM is gone; wait (briefly) until nothing answers on the distribution port, so
        // epmd has noticed, then kill epmd.
        let ports = self.ports();
        epmd_kill(ports.epmd);
    }

    async fn wait_port_closed(&self) {
        let ports = self.ports();
        let deadline = Instant::now() + Duration::from_secs(10);
        while port_open(ports.amqp) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn fail(&self, failure: &Failure) -> ! {
        let log = self.log_path();
        let console = self.dir.join("log").join("console.log");
        panic!(
            "RabbitMQ node {} (AMQP port {}) failed to start: {failure:?}\n\
             server log: {}\n{}\nconsole log: {}\n{}\n(the directory {} is left for inspection)",
            self.node(),
            self.port(),
            log.display(),
            tail(&log, 40),
            console.display(),
            tail(&console, 40),
            self.dir.display(),
        );
    }

    // ---------------------------------------------------------------- AMQP helpers

    /// Opens a connection to the node (the caller closes it, or drops it).
    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.amqp_uri(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.amqp_uri()))
    }

    /// Runs `f` with a fresh channel on a fresh connection, closing both (in that order)
    /// afterwards.
    async fn with_channel<T, F, Fut>(&self, f: F) -> T
    where
        F: FnOnce(Channel) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.expect("create channel");
        let result = f(channel.clone()).await;
        // Close the channel first and wait for close-ok: only then is it certain that the
        // broker has processed everything sent on it (acks are fire-and-forget; closing the
        // connection right after them can lose them, and the messages come back).
        if channel.status().connected() {
            let _ = channel.close(200, "bye".into()).await;
        }
        let _ = connection.close(200, "bye".into()).await;
        result
    }

    /// Declares what the platform would pre-create for one step: a durable direct exchange and
    /// durable queues for input, data, error, rebound, snapshot and reply, the output queues
    /// bound to the exchange with their routing keys. Names are unique per call
    /// (`<prefix>-<8 hex>`).
    pub async fn declare_topology(&self, prefix: &str) -> Topology {
        let p = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let topology = Topology {
            exchange: format!("{p}_exchange"),
            input_queue: format!("{p}:input"),
            data_queue: format!("{p}:data"),
            error_queue: format!("{p}:error"),
            rebound_queue: format!("{p}:rebound"),
            snapshot_queue: format!("{p}:snapshot"),
            reply_queue: format!("{p}:reply"),
            data_key: format!("{p}.message"),
            error_key: format!("{p}.error"),
            rebound_key: format!("{p}.rebound"),
            snapshot_key: format!("{p}.snapshot"),
            reply_key: format!("{p}.reply"),
            prefix: p,
        };
        let t = topology.clone();
        self.with_channel(|channel| async move {
            channel
                .exchange_declare(
                    t.exchange.as_str().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("declare exchange");
            for queue in [
                &t.input_queue,
                &t.data_queue,
                &t.error_queue,
                &t.rebound_queue,
                &t.snapshot_queue,
                &t.reply_queue,
            ] {
                channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::durable(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("declare queue {queue}: {e}"));
            }
            for (queue, key) in [
                (&t.data_queue, &t.data_key),
                (&t.error_queue, &t.error_key),
                (&t.rebound_queue, &t.rebound_key),
                (&t.snapshot_queue, &t.snapshot_key),
                (&t.reply_queue, &t.reply_key),
            ] {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        t.exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("bind {queue} to {key}: {e}"));
            }
        })
        .await;
        topology
    }

    /// Declares a durable queue (e.g. a custom reply queue).
    pub async fn declare_queue(&self, queue: &str) {
        self.with_channel(|channel| async move {
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("declare queue {queue}: {e}"));
        })
        .await;
    }

    /// Publishes `payload` to `queue` through the default exchange, persistent (delivery mode
    /// 2), with `headers` (a JSON object; see [`json_to_table`]). Waits for the broker's
    /// confirm; panics if the queue does not exist.
    pub async fn publish(&self, queue: &str, payload: &[u8], headers: Value) {
        let properties = BasicProperties::default()
            .with_headers(json_to_table(&headers))
            .with_delivery_mode(2);
        self.publish_with("", queue, payload, properties).await;
    }

    /// Publishes with full control over exchange, routing key and properties. Mandatory and
    /// confirmed: panics if the broker nacks or cannot route the message.
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) {
        self.with_channel(|channel| async move {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm_select");
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await
                .expect("basic_publish")
                .await
                .expect("publisher confirm");
            assert!(
                !confirm.is_nack(),
                "broker nacked the message to {exchange:?}/{routing_key:?}"
            );
            assert!(
                confirm.take_message().is_none(),
                "message to {exchange:?}/{routing_key:?} was unroutable (does the queue exist?)"
            );
        })
        .await;
    }

    /// Waits up to `timeout` for `n` messages on `queue`, acknowledging each; returns them in
    /// arrival order (fewer if the timeout passes). `n == 0` returns at once.
    pub async fn take(&self, queue: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        self.with_channel(|channel| async move {
            let mut received = Vec::with_capacity(n);
            while received.len() < n {
                let got = channel
                    .basic_get(queue.into(), BasicGetOptions::default())
                    .await
                    .unwrap_or_else(|e| panic!("basic_get on {queue}: {e}"));
                match got {
                    Some(message) => {
                        let delivery = message.delivery;
                        // On the channel itself (the delivery's `Acker` silently skips the ack
                        // when it considers itself poisoned).
                        channel
                            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                            .await
                            .expect("basic_ack");
                        received.push(Received::from_delivery(
                            &delivery.properties,
                            delivery.data.clone(),
                            delivery.exchange.as_str(),
                            delivery.routing_key.as_str(),
                            delivery.redelivered,
                        ));
                    }
                    None => {
                        if Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            received
        })
        .await
    }

    /// Number of messages ready in `queue` (panics if it does not exist).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.passive_declare(queue).await.message_count()
    }

    /// Number of consumers on `queue` (panics if it does not exist). Useful to wait until the
    /// component under test is consuming.
    pub async fn consumers(&self, queue: &str) -> u32 {
        self.passive_declare(queue).await.consumer_count()
    }

    /// The broker's view of an existing queue.
    async fn passive_declare(&self, queue: &str) -> lapin::Queue {
        self.with_channel(|channel| async move {
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"))
        })
        .await
    }

    /// Polls [`consumers`](Self::consumers) until `queue` has at least `n` consumers; returns
    /// whether it did within `timeout`.
    pub async fn wait_for_consumers(&self, queue: &str, n: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.consumers(queue).await >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let process = self
            .process
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(process) = process {
            self.kill_process(process);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
enum Failure {
    /// The server exited before accepting connections.
    Exited(String),
    /// It did not accept connections within the start timeout.
    Timeout,
}

/// The queues, exchange and routing keys of one step, as the platform would create them.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The unique prefix all names start with.
    pub prefix: String,
    pub exchange: String,
    pub input_queue: String,
    pub data_queue: String,
    pub error_queue: String,
    pub rebound_queue: String,
    pub snapshot_queue: String,
    pub reply_queue: String,
    pub data_key: String,
    pub error_key: String,
    pub rebound_key: String,
    pub snapshot_key: String,
    pub reply_key: String,
}

/// A message taken from a queue.
#[derive(Clone, Debug)]
pub struct Received {
    pub payload: Vec<u8>,
    /// The AMQP headers as a JSON object (`{}` when there are none).
    pub headers: Value,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub delivery_mode: Option<u8>,
    pub expiration: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    /// The exchange it was published to (`""` for the default exchange).
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
}

impl Received {
    fn from_delivery(
        properties: &BasicProperties,
        payload: Vec<u8>,
        exchange: &str,
        routing_key: &str,
        redelivered: bool,
    ) -> Received {
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
        Received {
            payload,
            headers: properties
                .headers()
                .as_ref()
                .map(table_to_json)
                .unwrap_or_else(|| json!({})),
            content_type: text(properties.content_type()),
            content_encoding: text(properties.content_encoding()),
            delivery_mode: *properties.delivery_mode(),
            expiration: text(properties.expiration()),
            message_id: text(properties.message_id()),
            correlation_id: text(properties.correlation_id()),
            reply_to: text(properties.reply_to()),
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            redelivered,
        }
    }

    /// The payload as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON (panics if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!("payload is not JSON ({e}): {}", self.text());
        })
    }
}

// -------------------------------------------------------------------- conversions

/// An AMQP field table as a JSON object: strings → strings, integers of any width, floats and
/// timestamps → numbers, booleans → booleans, tables → objects, arrays → arrays, anything else →
/// its `Debug` text.
pub fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), amqp_to_json(v)))
            .collect(),
    )
}

/// One AMQP field value as JSON (see [`table_to_json`]).
pub fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        other => json!(format!("{other:?}")),
    }
}

/// A JSON object as an AMQP field table: strings → long strings, integers → signed 32-bit if
/// they fit, else signed 64-bit (as amqplib does), other numbers → doubles, booleans →
/// booleans, objects → tables, arrays → arrays; nulls are left out. `null` (or any non-object)
/// gives an empty table.
pub fn json_to_table(headers: &Value) -> FieldTable {
    let mut table = FieldTable::default();
    if let Value::Object(map) = headers {
        insert_all(&mut table, map);
    }
    table
}

fn insert_all(table: &mut FieldTable, map: &Map<String, Value>) {
    for (k, v) in map {
        if let Some(v) = json_to_amqp(v) {
            table.insert(ShortString::from(k.as_str()), v);
        }
    }
}

/// One JSON value as an AMQP field value (`None` for null).
pub fn json_to_amqp(value: &Value) -> Option<AMQPValue> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                match i32::try_from(i) {
                    Ok(small) => AMQPValue::LongInt(small),
                    Err(_) => AMQPValue::LongLongInt(i),
                }
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().filter_map(json_to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            insert_all(&mut table, map);
            AMQPValue::FieldTable(table)
        }
    })
}

// -------------------------------------------------------------------- process plumbing

/// The node's environment (the child starts from an empty one).
fn node_env(dir: &str, ports: Ports, node: &str) -> Vec<(String, String)> {
    let vars = [
        (
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()
            }),
        ),
        ("LANG", "C.UTF-8".to_string()),
        ("LC_ALL", "C.UTF-8".to_string()),
        ("HOME", dir.to_string()),
        ("CGC_DIR", dir.to_string()),
        ("CGC_SERVER", server_script()),
        ("RABBITMQ_NODENAME", node.to_string()),
        ("RABBITMQ_USE_LONGNAME", "false".to_string()),
        ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_string()),
        ("RABBITMQ_NODE_PORT", ports.amqp.to_string()),
        ("RABBITMQ_DIST_PORT", ports.dist.to_string()),
        ("RABBITMQ_MNESIA_BASE", format!("{dir}/mnesia")),
        ("RABBITMQ_LOG_BASE", format!("{dir}/log")),
        ("RABBITMQ_LOGS", format!("{dir}/log/rabbit.log")),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE",
            format!("{dir}/enabled_plugins"),
        ),
        ("RABBITMQ_CONFIG_FILE", format!("{dir}/rabbitmq.conf")),
        (
            "RABBITMQ_ADVANCED_CONFIG_FILE",
            format!("{dir}/advanced.config"),
        ),
        ("RABBITMQ_CONF_ENV_FILE", format!("{dir}/rabbitmq-env.conf")),
        ("RABBITMQ_PID_FILE", format!("{dir}/rabbit.pid")),
        // Several nodes may share few CPUs: don't pin schedulers.
        ("RABBITMQ_SCHEDULER_BIND_TYPE", "u".to_string()),
        // A private epmd on loopback, killed by the watchdog when the node exits.
        ("ERL_EPMD_PORT", ports.epmd.to_string()),
        ("ERL_EPMD_ADDRESS", "127.0.0.1".to_string()),
        // Read by every `erl` (the server and RabbitMQ's epmd starter): loopback only.
        (
            "ERL_FLAGS",
            "-kernel inet_dist_use_interface {127,0,0,1}".to_string(),
        ),
        ("ERL_CRASH_DUMP", format!("{dir}/erl_crash.dump")),
        ("ERL_CRASH_DUMP_SECONDS", "0".to_string()),
    ];
    vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn write_static_files(dir: &Path) {
    std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
    std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
    let cookie_path = dir.join(".erlang.cookie");
    let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
    std::fs::write(&cookie_path, cookie).expect("write .erlang.cookie");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cookie_path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod .erlang.cookie");
}

/// Asks the watchdog for an orderly stop (it SIGTERMs the server) and closes its stdin.
fn tell_stop(process: &mut Process) {
    if let Some(mut stdin) = process.stdin.take() {
        let _ = stdin.write_all(b"stop\n");
        let _ = stdin.flush();
    }
}

/// Kills the private epmd on `port` (retrying briefly: epmd refuses while a node it has
/// registered still looks alive).
fn epmd_kill(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while port_open(port) && Instant::now() < deadline {
        let _ = Command::new("epmd")
            .arg("-kill")
            .env("ERL_EPMD_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !port_open(port) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A file's content from byte `offset` on (empty if it cannot be read).
fn read_from(path: &Path, offset: u64) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last `lines` lines of a file (for panic messages).
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}
