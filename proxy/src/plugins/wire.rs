//! The wire between Daisy and a plugin host: length-prefixed prost
//! messages over a Unix socket pair.
//!
//! Each frame is a 4-byte big-endian length, then one message. The host
//! speaks first with a [`Hello`] (what it loaded, or why it could not), then
//! answers each [`Request`] with a [`Reply`] carrying the request's id, in
//! whatever order runs finish. Both sides write whatever frames are queued
//! in one `write` call.

/// The largest frame either side accepts (a submission is at most a few MiB).
pub const MAX_FRAME: usize = 64 << 20;

/// The host's first frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// Empty when the library loaded; otherwise why it did not.
    #[prost(string, tag = "1")]
    pub error: String,
    /// The plugin crate's name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// The plugin crate's version.
    #[prost(string, tag = "3")]
    pub version: String,
    /// The plugin-api version it was built against.
    #[prost(string, tag = "4")]
    pub api_version: String,
    /// The tasks it exports.
    #[prost(string, repeated, tag = "5")]
    pub tasks: Vec<String>,
    /// The JSON Schema (JSON-encoded) of each task's config, for the tasks
    /// that declare one.
    #[prost(btree_map = "string, string", tag = "6")]
    pub schemas: std::collections::BTreeMap<String, String>,
}

/// One run (creating the task instance first if the host has not yet).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// Chosen by Daisy; the reply carries it back.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Which task instance (task, func and config) runs it.
    #[prost(uint64, tag = "2")]
    pub instance: u64,
    /// The task's func and JSON config: sent with the first request for an
    /// instance on each host, empty afterwards.
    #[prost(message, optional, tag = "3")]
    pub create: Option<Create>,
    /// The form's id.
    #[prost(string, tag = "4")]
    pub form_id: String,
    /// The submission's id.
    #[prost(string, tag = "5")]
    pub submission_id: String,
    /// The submission, JSON-encoded.
    #[prost(string, tag = "6")]
    pub submission_json: String,
    /// The attempt number, from 1.
    #[prost(uint32, tag = "7")]
    pub attempt: u32,
    /// The run's id.
    #[prost(string, tag = "8")]
    pub run_id: String,
    /// The submission's context, JSON-encoded; empty for none.
    #[prost(string, tag = "9")]
    pub context_json: String,
}

/// How to create a task instance.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Create {
    /// The task inside the library.
    #[prost(string, tag = "1")]
    pub func: String,
    /// Its JSON config.
    #[prost(string, tag = "2")]
    pub config_json: String,
}

/// The answer to one [`Request`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    /// The request's id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The output, JSON-encoded, when the run succeeded.
    #[prost(string, optional, tag = "2")]
    pub output_json: Option<String>,
    /// Why it failed, when it did.
    #[prost(message, optional, tag = "3")]
    pub error: Option<WireError>,
}

/// A failed run.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireError {
    /// What kind of failure.
    #[prost(enumeration = "ErrorKind", tag = "1")]
    pub kind: i32,
    /// What went wrong.
    #[prost(string, tag = "2")]
    pub message: String,
    /// The plugin's earliest useful retry, in milliseconds; 0 if none.
    #[prost(uint64, tag = "3")]
    pub retry_after_ms: u64,
}

/// The kinds of [`WireError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorKind {
    /// The task failed and a retry will not help.
    Permanent = 0,
    /// The task failed and a retry may help.
    Retryable = 1,
    /// The task could not be created (a constructor error or panic).
    Create = 2,
    /// The host went over its memory limit on this run and is retiring.
    OverMemory = 3,
}

/// Encodes `message` as one frame, appended to `out`.
pub fn encode(message: &impl prost::Message, out: &mut Vec<u8>) {
    let len = message.encoded_len();
    out.reserve(4 + len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message.encode(out).expect("a Vec grows to fit any message");
}

/// Reads one frame's body from a blocking reader; `None` at a clean end.
pub fn read_blocking(reader: &mut impl std::io::Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = frame_len(len)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Reads one frame's body from an async reader; `None` at a clean end.
pub async fn read_async(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = frame_len(len)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(Some(body))
}

fn frame_len(len: [u8; 4]) -> std::io::Result<usize> {
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {MAX_FRAME}"),
        ));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut buf = Vec::new();
        let a = Request {
            id: 7,
            instance: 3,
            create: Some(Create {
                func: "echo".into(),
                config_json: "{}".into(),
            }),
            submission_json: "{\"x\":1}".into(),
            ..Default::default()
        };
        let b = Reply {
            id: 7,
            output_json: Some("{}".into()),
            error: None,
        };
        encode(&a, &mut buf);
        encode(&b, &mut buf);
        let mut reader = std::io::Cursor::new(buf);
        let first = read_blocking(&mut reader).expect("read").expect("a frame");
        assert_eq!(
            <Request as prost::Message>::decode(&first[..]).expect("decode"),
            a
        );
        let second = read_blocking(&mut reader).expect("read").expect("a frame");
        assert_eq!(
            <Reply as prost::Message>::decode(&second[..]).expect("decode"),
            b
        );
        assert!(read_blocking(&mut reader).expect("read").is_none());
    }

    #[test]
    fn an_oversized_frame_is_refused() {
        let mut reader = std::io::Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(read_blocking(&mut reader).is_err());
    }
}
