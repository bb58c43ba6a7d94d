//! Tumbling event-time windows with allowed lateness. An event belongs to the window its event
//! time falls in; a window closes once the watermark (the latest event time seen, less the allowed
//! lateness) passes its end; an event for a closed window is late.

use serde::{Deserialize, Serialize};

/// `[start_ms, end_ms)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// Windows of one size, aligned on the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tumbling {
    size_ms: i64,
}

impl Tumbling {
    /// None unless `size_ms` is positive.
    pub fn new(size_ms: i64) -> Option<Self> {
        (size_ms > 0).then_some(Self { size_ms })
    }

    /// The window of an event at `t_ms` (times before the epoch included).
    pub fn window(&self, t_ms: i64) -> Window {
        let start = t_ms.div_euclid(self.size_ms) * self.size_ms;
        Window {
            start_ms: start,
            end_ms: start.saturating_add(self.size_ms),
        }
    }
}

/// The event-time progress one reducer has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    lateness_ms: i64,
    /// The latest event time seen.
    max_event_ms: Option<i64>,
}

impl Watermark {
    pub fn new(lateness_ms: i64) -> Self {
        Self {
            lateness_ms: lateness_ms.max(0),
            max_event_ms: None,
        }
    }

    /// Notes an event at `t_ms`.
    pub fn observe(&mut self, t_ms: i64) {
        self.max_event_ms = Some(self.max_event_ms.map_or(t_ms, |m| m.max(t_ms)));
    }

    /// Event time up to which every window is complete: nothing earlier is accepted any more.
    pub fn now_ms(&self) -> Option<i64> {
        self.max_event_ms
            .map(|m| m.saturating_sub(self.lateness_ms))
    }

    /// Whether `window` is closed: its result final, its late events refused.
    pub fn closes(&self, window: &Window) -> bool {
        self.now_ms().is_some_and(|now| now >= window.end_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_tile_time_and_close_after_the_lateness() {
        let minute = Tumbling::new(60_000).unwrap();
        assert_eq!(
            minute.window(119_999),
            Window {
                start_ms: 60_000,
                end_ms: 120_000
            }
        );
        assert_eq!(minute.window(120_000).start_ms, 120_000);
        assert_eq!(minute.window(-1).start_ms, -60_000);
        assert!(Tumbling::new(0).is_none());

        let mut mark = Watermark::new(10_000);
        let first = minute.window(5_000);
        assert!(!mark.closes(&first), "nothing seen yet");
        mark.observe(65_000);
        assert!(!mark.closes(&first), "within the lateness");
        mark.observe(20_000);
        assert_eq!(mark.now_ms(), Some(55_000), "time never goes back");
        mark.observe(70_000);
        assert!(mark.closes(&first));
        assert!(!mark.closes(&minute.window(70_000)));
    }
}
