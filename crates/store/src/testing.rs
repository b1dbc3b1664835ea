//! A private PostgreSQL server for tests: the first call starts one from the PostgreSQL
//! binaries installed here (`PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `PATH`),
//! on a free loopback port with its data in a temporary directory, and every test takes a fresh
//! database of its own. A watchdog process stops the server and removes its directory when the
//! test process ends. There is no skipping: without PostgreSQL the tests fail, saying what to
//! install.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

/// A running test server.
pub struct TestPostgres {
    pub port: u16,
    /// The directory holding the data and the socket.
    pub dir: PathBuf,
}

static SERVER: OnceLock<TestPostgres> = OnceLock::new();
static TLS_SERVER: OnceLock<TestPostgresTls> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The server of this test process, started on first use.
pub fn postgres() -> &'static TestPostgres {
    SERVER.get_or_init(|| {
        start(None).unwrap_or_else(|e| {
            panic!(
                "cannot start a PostgreSQL server for the tests: {e}\n\
                 (install Debian's `postgresql` package; `.ci/run` does)"
            )
        })
    })
}

/// A server that takes TCP connections over TLS only, with its certificates.
pub struct TestPostgresTls {
    pub server: TestPostgres,
    /// The CA that signed the server's certificate (PEM). The certificate names `localhost`
    /// only, not 127.0.0.1.
    pub ca: PathBuf,
    /// A CA that signed nothing of this server's.
    pub other_ca: PathBuf,
}

/// The TLS-only server of this test process, started on first use (certificates made with
/// the `openssl` program).
pub fn postgres_tls() -> &'static TestPostgresTls {
    TLS_SERVER.get_or_init(|| {
        let certs = std::env::temp_dir().join(format!("inspector-pg-certs-{}", std::process::id()));
        let made = make_certificates(&certs).unwrap_or_else(|e| {
            panic!("cannot make test certificates: {e} (install Debian's `openssl` package)")
        });
        let server = start(Some(&made)).unwrap_or_else(|e| {
            panic!(
                "cannot start a PostgreSQL server with TLS for the tests: {e}\n\
                 (install Debian's `postgresql` package; `.ci/run` does)"
            )
        });
        TestPostgresTls {
            server,
            ca: made.ca,
            other_ca: made.other_ca,
        }
    })
}

/// The certificates a TLS test server uses.
struct Certificates {
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn make_certificates(dir: &Path) -> Result<Certificates, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let openssl = |args: &[&str]| {
        let mut c = Command::new("openssl");
        c.args(args).current_dir(dir);
        run(c, "openssl")
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, cn) in [("ca", "inspector test CA"), ("other", "another CA")] {
        let key = format!("{name}.key");
        let crt = format!("{name}.crt");
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt, "-days", "2"]);
        let subject = format!("/CN={cn}");
        args.extend(["-subj", &subject]);
        openssl(&args)?;
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&args)?;
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").map_err(|e| e.to_string())?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ])?;
    // Removed with the test process, as the servers' own directories are.
    let _ = Command::new("sh")
        .args([
            "-c",
            &format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; rm -rf '{}'",
                std::process::id(),
                dir.display()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    Ok(Certificates {
        ca: dir.join("ca.crt"),
        other_ca: dir.join("other.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
    })
}

impl TestPostgres {
    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// A new empty database, by URL.
    pub fn fresh_database(&self) -> String {
        let name = self.fresh_database_name();
        self.url(&name)
    }

    /// A new empty database, by name (created over the server's Unix socket, which takes no
    /// TLS).
    pub fn fresh_database_name(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = postgres::Config::new();
        admin
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres");
        let create = format!("CREATE DATABASE {name}");
        // On a thread of its own: the client runs a runtime, which may not start inside an
        // async test's.
        let created = std::thread::spawn(move || {
            let mut client = admin
                .connect(postgres::NoTls)
                .map_err(|e| format!("connecting to the test server: {e}"))?;
            client
                .batch_execute(&create)
                .map_err(|e| format!("creating a test database: {e}"))
        })
        .join()
        .unwrap_or_else(|_| Err("the client thread panicked".into()));
        if let Err(e) = created {
            panic!("{e}\n{}", self.diagnosis());
        }
        name
    }

    /// The end of the server's log and the free space where it keeps its data, for a failure's
    /// message (a full disk shows up as "could not write init file").
    pub fn diagnosis(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        let df = Command::new("df")
            .arg("-h")
            .arg(&self.dir)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!(
            "the test server's log ({}):\n{tail}\nfree space:\n{df}",
            self.dir.join("log").display()
        )
    }
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(dir.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .map_err(|e| e.to_string())?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    Path::new(&path)
        .parent()
        .filter(|_| found.status.success())
        .map(Path::to_path_buf)
        .ok_or_else(|| "no initdb: set PG_BIN or install PostgreSQL".into())
}

/// A command run as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start(tls: Option<&Certificates>) -> Result<TestPostgres, String> {
    let bin = bin_dir()?;
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let dir = std::env::temp_dir().join(format!(
        "inspector-pg-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if root {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:").arg(&dir);
                c
            },
            "chown",
        )?;
    }
    let data = dir.join("data");
    let mut initdb = as_server_user(&bin.join("initdb"), root);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        // 1 MB WAL segments instead of 16: a test server needs little disk.
        .arg("--wal-segsize=1")
        .args(["--locale", "C.UTF-8"]);
    run(initdb, "initdb")?;
    let mut tls_options = String::new();
    if let Some(certs) = tls {
        // TCP only over TLS; the Unix socket (for creating databases) as before.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .map_err(|e| format!("pg_hba.conf: {e}"))?;
        for (from, to) in [
            (&certs.server_cert, "server.crt"),
            (&certs.server_key, "server.key"),
        ] {
            std::fs::copy(from, data.join(to)).map_err(|e| format!("{to}: {e}"))?;
        }
        let mut chmod = Command::new("chmod");
        chmod.arg("600").arg(data.join("server.key"));
        run(chmod, "chmod")?;
        if root {
            let mut chown = Command::new("chown");
            chown
                .arg("postgres:")
                .arg(data.join("server.key"))
                .arg(data.join("server.crt"))
                .arg(data.join("pg_hba.conf"));
            run(chown, "chown")?;
        }
        tls_options = " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".into();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut pg_ctl = as_server_user(&bin.join("pg_ctl"), root);
    pg_ctl
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("log"))
        .arg("-w")
        .arg("-o")
        .arg(format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             -c min_wal_size=4MB -c max_wal_size=64MB{tls_options}",
            dir.display()
        ))
        .arg("start");
    run(pg_ctl, "pg_ctl start")?;
    // Stop the server and remove its files once this process is gone, however it ends.
    let stop = format!(
        "{} -D '{}' stop -m immediate",
        if root {
            format!("runuser -u postgres -- '{}'", bin.join("pg_ctl").display())
        } else {
            format!("'{}'", bin.join("pg_ctl").display())
        },
        data.display()
    );
    let watchdog = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{}'",
        std::process::id(),
        dir.display()
    );
    Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the watchdog: {e}"))?;
    Ok(TestPostgres { port, dir })
}
