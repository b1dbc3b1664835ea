//! The photo store over a folder and over S3 (an s3s-fs server on loopback): the same answers,
//! durable puts, names checked, and errors that name the store.

use inspector_photos::{Error, PhotoStore};
use inspector_s3_test_server::S3TestServer;

fn s3_settings(s3: &S3TestServer) -> Vec<(&'static str, String)> {
    vec![
        ("aws_endpoint", s3.endpoint.clone()),
        ("aws_access_key_id", s3.access_key.clone()),
        ("aws_secret_access_key", s3.secret_key.clone()),
        ("aws_allow_http", "true".into()),
    ]
}

fn open_s3(spec: &str, settings: &[(&'static str, String)]) -> PhotoStore {
    let refs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    PhotoStore::open_with(spec, &refs).unwrap()
}

fn exercise(photos: &PhotoStore) {
    let jpeg = vec![0xff, 0xd8, 1, 2, 3, 0xff, 0xd9];
    let name = format!("images/ab/{}.jpg", "ab".repeat(32));
    assert!(!photos.exists(&name).unwrap());
    assert_eq!(photos.get(&name).unwrap(), None);
    photos.put(&name, &jpeg).unwrap();
    assert!(photos.exists(&name).unwrap());
    assert_eq!(photos.get(&name).unwrap(), Some(jpeg.clone()));
    // The same name again (another replica stored the same photo) is harmless.
    photos.put(&name, &jpeg).unwrap();
    assert_eq!(photos.get(&name).unwrap(), Some(jpeg));
    photos.put("events/00000000000000ff.jpg", b"frame").unwrap();
    assert_eq!(
        photos
            .get("events/00000000000000ff.jpg")
            .unwrap()
            .as_deref(),
        Some(&b"frame"[..])
    );
    // Only names the server makes.
    for bad in [
        "",
        "../etc/passwd",
        "images/../../x",
        "/abs",
        "a//b",
        "images/.tmp1",
        "é/x",
    ] {
        assert!(
            matches!(photos.put(bad, b"x"), Err(Error::BadName(_))),
            "{bad:?} must be refused"
        );
        assert!(matches!(photos.get(bad), Err(Error::BadName(_))), "{bad:?}");
    }
}

#[test]
fn a_folder_stores_and_reads_photos() {
    let dir = tempfile::tempdir().unwrap();
    let photos = PhotoStore::open(dir.path().join("data").to_str().unwrap()).unwrap();
    exercise(&photos);
    assert!(
        dir.path()
            .join("data/events/00000000000000ff.jpg")
            .is_file()
    );
    assert_eq!(photos.as_folder(), Some(dir.path().join("data").as_path()));
}

#[test]
fn s3_stores_and_reads_photos_as_a_folder_does() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3TestServer::start(dir.path(), &["photos"]).unwrap();
    let photos = open_s3("s3://photos/plant-7", &s3_settings(&s3));
    assert_eq!(photos.describe(), "s3://photos/plant-7");
    assert!(photos.as_folder().is_none());
    exercise(&photos);
    // The objects are where an S3 client would look: bucket, prefix, name.
    assert_eq!(
        std::fs::read(
            dir.path()
                .join("photos/plant-7/events/00000000000000ff.jpg")
        )
        .unwrap(),
        b"frame"
    );
    // Also from inside an async runtime (the server's handlers).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        assert!(photos.exists("events/00000000000000ff.jpg").unwrap());
        // And the store's last handle may go there too.
        drop(photos);
    });
}

#[test]
fn s3_errors_name_the_store_and_the_photo() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3TestServer::start(dir.path(), &["photos"]).unwrap();
    let mut wrong = s3_settings(&s3);
    wrong[2].1 = "not-the-secret".into();
    let photos = open_s3("s3://photos", &wrong);
    let err = photos.put("images/ab/x.jpg", b"x").unwrap_err().to_string();
    assert!(
        err.contains("images/ab/x.jpg") && err.contains("s3://photos"),
        "{err}"
    );
    // A server that is gone.
    let photos = open_s3("s3://photos", &s3_settings(&s3));
    drop(s3);
    let err = photos.get("images/ab/x.jpg").unwrap_err().to_string();
    assert!(
        err.contains("reading images/ab/x.jpg in s3://photos"),
        "{err}"
    );
    assert!(PhotoStore::open("s3://").is_err());
}
