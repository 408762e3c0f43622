//! The embedded assets (stylesheet, the log viewer's script, the icon):
//! served under a URL that carries their content hash, so they are cached
//! for a year and change URL when they change; gzip when the browser takes
//! it (compressed once, on first use).

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const FILES: &[(&str, &str, &[u8])] = &[
    (
        "kiln.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/kiln.css"),
    ),
    (
        "kiln.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/kiln.js"),
    ),
    (
        "kiln.svg",
        "image/svg+xml",
        include_bytes!("../../assets/kiln.svg"),
    ),
];

struct Asset {
    mime: &'static str,
    raw: &'static [u8],
    gzip: Vec<u8>,
    /// First 12 hex digits of the content's sha256.
    hash: String,
}

fn all() -> &'static HashMap<&'static str, Asset> {
    static ALL: OnceLock<HashMap<&'static str, Asset>> = OnceLock::new();
    ALL.get_or_init(|| {
        FILES
            .iter()
            .map(|(name, mime, raw)| {
                use std::io::Write as _;
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                let _ = gz.write_all(raw);
                let gzip = gz.finish().unwrap_or_default();
                let hash = crate::cas::Digest::of(raw).to_hex()[..12].to_string();
                (
                    *name,
                    Asset {
                        mime,
                        raw,
                        gzip,
                        hash,
                    },
                )
            })
            .collect()
    })
}

/// The URL of asset `name`, versioned by its content.
pub fn url(name: &str) -> String {
    match all().get(name) {
        Some(a) => format!("/assets/{name}?v={}", a.hash),
        None => format!("/assets/{name}"),
    }
}

pub async fn serve(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(a) = all().get(file.as_str()) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().map(str::trim) == Some("gzip"));
    let mut r = if gzip && a.gzip.len() < a.raw.len() {
        let mut r = a.gzip.clone().into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        a.raw.into_response()
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.mime));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    r
}
