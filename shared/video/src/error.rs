/// Why a video could not be used. Everything but [`VideoError::Internal`] is about the input: it
/// will fail the same way every time, so a stage dead-letters it instead of retrying.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("the file is empty (0 bytes)")]
    Empty,
    #[error("not a readable video: {0}")]
    Unreadable(String),
    #[error(
        "the input is a `{format}` file, which is not allowed: only self-contained containers \
         are read (playlists and references to other files or URLs are refused)"
    )]
    FormatNotAllowed { format: String },
    #[error("the input has no video stream (streams: {streams})")]
    NoVideo { streams: String },
    #[error("the video's {what} is {value}, over the limit of {limit}")]
    OverLimit {
        what: &'static str,
        value: String,
        limit: String,
    },
    #[error("the video's duration is unknown and could not be measured")]
    UnknownDuration,
    #[error("no frame could be decoded {0}")]
    NoFrame(String),
    #[error("processing took longer than the limit of {limit_s} s")]
    TimedOut { limit_s: f64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl VideoError {
    /// Whether the input (or the request) is at fault, as opposed to this process.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, VideoError::Internal(_))
    }

    pub(crate) fn unreadable(e: impl std::fmt::Display) -> Self {
        VideoError::Unreadable(e.to_string())
    }
}
