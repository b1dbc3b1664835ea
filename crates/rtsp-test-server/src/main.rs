//! A test-only RTSP server: streams a still image as MJPEG over RTP (RTSP over TCP or UDP) at
//! `rtsp://127.0.0.1:PORT/cam` until it is killed, so that the camera tests can cut a stream
//! and restore it. Debian packages GStreamer's RTSP server library but no server program; this
//! is the smallest one, on the `gstreamer-rtsp-server` crate.
//!
//! ```text
//! cargo build -p inspector-rtsp-test-server --features gst
//! target/debug/inspector-rtsp-test-server 8554 scene.png 5     # PORT IMAGE.png [FPS]
//! ```
//!
//! It prints the stream's URL once it listens.

#[cfg(feature = "gst")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use gstreamer::glib;
    use gstreamer_rtsp_server::prelude::*;

    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(image)) = (args.get(1), args.get(2)) else {
        return Err("usage: inspector-rtsp-test-server PORT IMAGE.png [FPS]".into());
    };
    let fps: u32 = args.get(3).map_or(Ok(5), |f| f.parse())?;
    let port: u16 = port.parse()?;
    if !std::path::Path::new(image).is_file() {
        return Err(format!("{image}: no such file").into());
    }
    gstreamer::init()?;
    let main_loop = glib::MainLoop::new(None, false);
    let server = gstreamer_rtsp_server::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&port.to_string());
    let mounts = server
        .mount_points()
        .ok_or("the server has no mount points")?;
    let factory = gstreamer_rtsp_server::RTSPMediaFactory::new();
    // The path is quoted for gst-launch's syntax; the tests pass plain temporary paths.
    factory.set_launch(&format!(
        "( multifilesrc location=\"{image}\" loop=true caps=image/png,framerate={fps}/1 \
         ! pngdec ! videoconvert ! video/x-raw,format=I420 ! jpegenc quality=90 \
         ! rtpjpegpay name=pay0 pt=26 )"
    ));
    factory.set_shared(true);
    mounts.add_factory("/cam", factory);
    let _source = server.attach(None)?;
    println!("rtsp://127.0.0.1:{port}/cam");
    main_loop.run();
    Ok(())
}

#[cfg(not(feature = "gst"))]
fn main() {
    eprintln!(
        "inspector-rtsp-test-server was built without the `gst` feature: \
         cargo build -p inspector-rtsp-test-server --features gst"
    );
    std::process::exit(2);
}
