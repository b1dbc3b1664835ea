//! TLS to PostgreSQL with libpq's `sslmode` and `sslrootcert`, against a test server that takes
//! TCP connections over TLS only (its certificate names `localhost`, signed by a test CA).

use inspector_store::testing::postgres_tls;

fn url(host: &str, db: &str, query: &str) -> String {
    let port = postgres_tls().server.port;
    format!("postgres://postgres:s3cret-pw@{host}:{port}/{db}?{query}")
}

fn open_err(url: &str) -> String {
    match inspector_store::open(url) {
        Ok(_) => panic!("{url} must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tls_modes_connect_and_check_as_libpq_does() {
    let tls = postgres_tls();
    let db = tls.server.fresh_database_name();
    let ca = tls.ca.display().to_string();
    let other = tls.other_ca.display().to_string();

    // Without TLS the server refuses (TCP only over TLS): so the ones that connect use it.
    let err = open_err(&url("localhost", &db, "sslmode=disable"));
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("s3cret"), "the password never shows: {err}");

    // Encrypted, certificate unchecked (libpq's prefer and require).
    for query in ["sslmode=prefer", "sslmode=require", ""] {
        let store = inspector_store::open(&url("127.0.0.1", &db, query))
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        assert_eq!(store.schema_version().unwrap(), 6);
    }
    // The chain and the name checked.
    inspector_store::open(&url(
        "localhost",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .unwrap();
    // The certificate does not name 127.0.0.1: verify-full refuses, verify-ca (chain only)
    // and require with a root certificate (which checks the chain) accept.
    let err = open_err(&url(
        "127.0.0.1",
        &db,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(err.contains("cannot connect"), "{err}");
    for mode in ["verify-ca", "require"] {
        inspector_store::open(&url(
            "127.0.0.1",
            &db,
            &format!("sslmode={mode}&sslrootcert={ca}"),
        ))
        .unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    // Another CA: refused in every checking mode.
    for mode in ["verify-full", "verify-ca", "require"] {
        let err = open_err(&url(
            "localhost",
            &db,
            &format!("sslmode={mode}&sslrootcert={other}"),
        ));
        assert!(err.contains("cannot connect"), "{mode}: {err}");
        assert!(!err.contains("s3cret"), "{err}");
    }
    // Bad settings are named.
    let err = open_err(&url("localhost", &db, "sslmode=always"));
    assert!(err.contains("sslmode=always"), "{err}");
    let err = open_err(&url(
        "localhost",
        &db,
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ));
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}
