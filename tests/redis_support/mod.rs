//! A private `redis-server` per test, for `tests/conversations_redis.rs`.
//!
//! Each [`RedisServer`] runs the real `redis-server` (from `PATH`, or `CGC_REDIS_SERVER`) as a
//! child, listening on a free port on 127.0.0.1 only, with its own temp directory as working
//! directory (`$TMPDIR/cgc-redis-<pid>-<n>-<random>`), no snapshots (`--save ''`), no append-only
//! file, and its output in `redis.log` there. Nothing of the system's Redis is used or touched.
//!
//! The server is wrapped in a small `sh` watchdog (leader of its own process group) whose stdin
//! is a pipe from the test process: dropping the [`RedisServer`] closes the pipe, the watchdog
//! stops the server (SIGTERM), deletes the temp directory and exits; if the test process dies
//! without dropping it, the pipe closes all the same, so no server (or directory) outlives its
//! test. If the server does not exit within a few
//! seconds, the process group is killed.
//!
//! There is no "skip": if `redis-server` is missing, [`RedisServer::start`] panics and says to run
//! `bash scripts/test`, which installs it.
//!
//! Use from an integration test with `mod redis_support;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the server may take to exit once told to.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Start attempts (with fresh ports) when the server does not start, e.g. its port was taken.
const START_ATTEMPTS: usize = 3;

/// Runs the server; SIGTERM to it once stdin (fd 3, kept from the test process) reads EOF or a
/// line; deletes the server's directory once it exited.
const WATCHDOG: &str = r#"
exec 3<&0
"$CGC_REDIS" "$@" </dev/null &
srv=$!
(
  read -r _ <&3
  kill -TERM "$srv" 2>/dev/null
) </dev/null &
exec 3<&-
wait "$srv"
status=$?
rm -rf "${CGC_REDIS_DIR:?}"
exit $status
"#;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A free TCP port on 127.0.0.1 (bound, read and released; nothing listens on it after).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The `redis-server` to run: `CGC_REDIS_SERVER`, else the first on `PATH`. Panics if none.
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CGC_REDIS_SERVER") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| is_executable(candidate))
    });
    match found {
        Some(path) => path,
        None => panic!(
            "redis-server is not installed (not on PATH, and CGC_REDIS_SERVER is not set): \
             the Redis conversation-store tests need a real server. Run the tests with \
             `bash scripts/test`, which installs it (apt package redis-server), or install it \
             yourself (`apt-get install redis-server`, `brew install redis`)."
        ),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// A private Redis server. See the module documentation.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    /// It answered PING (so stopping waits for its port to close).
    ready: bool,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--requirepass", "pw"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut attempt = 1;
        loop {
            match Self::launch(free_port(), extra) {
                Ok(server) => return server,
                Err(why) if attempt < START_ATTEMPTS => {
                    eprintln!("redis: server did not start ({why}); retrying with another port");
                    attempt += 1;
                }
                Err(why) => panic!("redis: cannot start redis-server: {why}"),
            }
        }
    }

    /// Starts a server on `port` (e.g. the port of one just dropped, to test reconnecting).
    /// Panics if it cannot.
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        // The port of a server just stopped can stay busy for a moment.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match Self::launch(port, extra) {
                Ok(server) => return server,
                Err(why) if Instant::now() < deadline => {
                    eprintln!(
                        "redis: server on port {port} exited during start-up ({why}); retrying"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(why) => panic!("redis: cannot start redis-server on port {port}: {why}"),
            }
        }
    }

    fn launch(port: u16, extra: &[&str]) -> Result<RedisServer, String> {
        let binary = server_binary();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "cgc-redis-{}-{n}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("create the server's temp dir");
        let log = std::fs::File::create(dir.join("redis.log")).expect("create redis.log");
        let port_arg = port.to_string();
        let dir_arg = dir.display().to_string();
        let mut args = vec![
            "--port",
            &port_arg,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_arg,
            "--daemonize",
            "no",
        ];
        args.extend_from_slice(extra);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("cgc-redis-watchdog")
            .args(&args)
            .env("CGC_REDIS", &binary)
            .env("CGC_REDIS_DIR", &dir)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("redis: cannot run sh for {}: {e}", binary.display()));
        let stdin = child.stdin.take();
        let mut server = RedisServer {
            port,
            dir,
            child,
            stdin,
            ready: false,
        };
        match server.wait_ready() {
            Ok(()) => Ok(server),
            Err(why) => Err(format!("{why}; log:\n{}", server.log_tail())),
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("it exited with {status}"));
            }
            if self.ping() {
                self.ready = true;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no PONG within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server answers `PING` (with `+PONG`, or `-NOAUTH` when it requires a password).
    pub fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => reply.push(byte[0]),
                _ => return false,
            }
        }
        reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH")
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temp directory (`redis.log` is its output).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last lines of the server's output.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A connection of its own (not the store's), to look at keys directly.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("the server's URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test server")
    }

    /// Stops the server (closes the watchdog's stdin, kills the group if it lingers) and waits
    /// until the port is closed.
    fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            eprintln!(
                "redis: server on port {} did not stop; killing it",
                self.port
            );
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
            let _ = self.child.wait();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.ready
            && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
