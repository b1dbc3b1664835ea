//! `inspector-s3-test-server DIR BUCKET...`: serves DIR as S3 on loopback until killed, printing
//! the endpoint and the key pair (for trying `serve --photo-store s3://…` by hand).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((dir, buckets)) = args.split_first() else {
        eprintln!("usage: inspector-s3-test-server DIR BUCKET...");
        std::process::exit(2);
    };
    let buckets: Vec<&str> = buckets.iter().map(String::as_str).collect();
    let s3 = inspector_s3_test_server::S3TestServer::start(std::path::Path::new(dir), &buckets)
        .unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1);
        });
    println!(
        "AWS_ENDPOINT={} AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={}",
        s3.endpoint, s3.access_key, s3.secret_key
    );
    loop {
        std::thread::park();
    }
}
