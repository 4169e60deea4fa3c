//! Attachments OpenAI cannot reach: downloaded and sent inline.
//!
//! Users map platform files into content parts. OpenAI fetches public image URLs itself, but not
//! files in the platform's object storage (Maester, marked `storage_type=maester`), not the
//! platform's internal attachment URLs (the message's `attachments`, cluster-internal hosts),
//! and never a `file.file_url` (not an OpenAI field; the Node.js component accepted it). Those
//! are downloaded, size-limited, and rewritten as a data URL (`image_url.url`) or as
//! `file.file_data` with a `filename`.

use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use crate::emit::ErrorEvent;
use crate::secret::Secret;

/// The largest attachment sent inline: OpenAI's own limit for an image.
pub const MAX_BYTES: usize = 20 * 1024 * 1024;

/// The platform's object storage, when running on the platform.
#[derive(Clone, Debug, Default)]
pub struct Storage {
    /// `ELASTICIO_OBJECT_STORAGE_URI`: objects are fetched from `{uri}/objects/{id}`.
    pub uri: Option<String>,
    /// `ELASTICIO_OBJECT_STORAGE_TOKEN`, sent as a Bearer token.
    pub token: Option<Secret>,
}

/// Rewrites every part of `body.messages[*].content` that needs it.
pub async fn inline(
    http: &reqwest::Client,
    body: &mut Map<String, Value>,
    attachments: &Map<String, Value>,
    storage: &Storage,
) -> Result<(), ErrorEvent> {
    let platform_urls: Vec<&str> = attachments
        .values()
        .filter_map(|a| a.get("url").and_then(Value::as_str))
        .collect();
    let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else {
        return Ok(());
    };
    for (m, message) in messages.iter_mut().enumerate() {
        let Some(parts) = message.get_mut("content").and_then(Value::as_array_mut) else {
            continue;
        };
        for (p, part) in parts.iter_mut().enumerate() {
            let at = format!("/messages/{m}/content/{p}");
            match part.get("type").and_then(Value::as_str) {
                Some("image_url") => {
                    let Some(url) = part.pointer("/image_url/url").and_then(Value::as_str) else {
                        continue;
                    };
                    if url.starts_with("data:") || !is_internal(url, &platform_urls) {
                        continue;
                    }
                    let pointer = format!("{at}/image_url/url");
                    let file = download(http, url, storage, &pointer).await?;
                    part["image_url"]["url"] = json!(file.data_url());
                }
                Some("file") => {
                    let Some(url) = part.pointer("/file/file_url").and_then(Value::as_str) else {
                        continue;
                    };
                    let pointer = format!("{at}/file/file_url");
                    let file = download(http, url, storage, &pointer).await?;
                    let filename = part
                        .pointer("/file/filename")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| file.name.clone());
                    part["file"] = json!({"filename": filename, "file_data": file.data_url()});
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// True for URLs only the platform can reach.
fn is_internal(url: &str, platform_urls: &[&str]) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = parsed.host_str().unwrap_or_default();
    is_maester(&parsed)
        || platform_urls.contains(&url)
        || host.ends_with(".svc")
        || host.ends_with(".cluster.local")
}

fn is_maester(url: &reqwest::Url) -> bool {
    url.query_pairs()
        .any(|(k, v)| k == "storage_type" && v == "maester")
}

struct Downloaded {
    name: String,
    content_type: String,
    bytes: Vec<u8>,
}

impl Downloaded {
    fn data_url(&self) -> String {
        let data = base64::engine::general_purpose::STANDARD.encode(&self.bytes);
        format!("data:{};base64,{data}", self.content_type)
    }
}

async fn download(
    http: &reqwest::Client,
    url: &str,
    storage: &Storage,
    pointer: &str,
) -> Result<Downloaded, ErrorEvent> {
    let fail = |problem: String| {
        ErrorEvent::new(
            "AttachmentError",
            format!("{pointer}: {problem}"),
            json!({ "pointer": pointer }),
        )
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| fail("is not a valid URL".into()))?;
    let name = parsed
        .path_segments()
        .and_then(|mut s| s.next_back())
        .filter(|s| !s.is_empty())
        .unwrap_or("attachment")
        .to_string();
    let mut request = if is_maester(&parsed) {
        let token = storage.token.as_ref().ok_or_else(|| {
            fail("is in the platform's object storage, which is reachable only when running on the platform (ELASTICIO_OBJECT_STORAGE_TOKEN is not set)".into())
        })?;
        let target = match &storage.uri {
            Some(base) => format!("{}/objects/{name}", base.trim_end_matches('/')),
            None => url.to_string(),
        };
        http.get(target).bearer_auth(token.expose())
    } else {
        http.get(parsed.clone())
    };
    request = request.timeout(std::time::Duration::from_secs(120));
    let host = parsed.host_str().unwrap_or_default().to_string();
    let response = request.send().await.map_err(|e| {
        fail(format!(
            "could not be downloaded from {host}: {}",
            e.without_url()
        ))
    })?;
    if !response.status().is_success() {
        return Err(fail(format!(
            "could not be downloaded from {host}: HTTP {}",
            response.status()
        )));
    }
    let too_large = || {
        fail(format!(
            "is larger than the {} MiB attachment limit",
            MAX_BYTES / (1024 * 1024)
        ))
    };
    if response
        .content_length()
        .is_some_and(|n| n as usize > MAX_BYTES)
    {
        return Err(too_large());
    }
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .filter(|v| !v.is_empty() && v != "application/octet-stream")
        .unwrap_or_else(|| guess_type(&name).to_string());
    let mut bytes = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            fail(format!(
                "download from {host} broke off: {}",
                e.without_url()
            ))
        })?;
        if bytes.len() + chunk.len() > MAX_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Downloaded {
        name,
        content_type,
        bytes,
    })
}

fn guess_type(name: &str) -> &'static str {
    let ext = name
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_platform_urls_are_internal() {
        let listed = ["http://steward/files/a.png"];
        assert!(is_internal(
            "http://maester:3002/objects/1?storage_type=maester",
            &[]
        ));
        assert!(is_internal("http://steward/files/a.png", &listed));
        assert!(is_internal(
            "http://steward-service.platform.svc.cluster.local/x.png",
            &[]
        ));
        assert!(!is_internal("https://example.com/cat.png", &listed));
        assert!(!is_internal("not a url", &[]));
    }

    #[test]
    fn guesses_types_from_names() {
        assert_eq!(guess_type("Report.PDF"), "application/pdf");
        assert_eq!(guess_type("x.jpeg"), "image/jpeg");
        assert_eq!(guess_type("blob"), "application/octet-stream");
    }
}
