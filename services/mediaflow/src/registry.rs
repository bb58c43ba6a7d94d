//! The stage kinds this platform knows, by name: the linking kinds of ch. 11 and the media
//! stages. It checks a declared stage of each kind (its settings and ports) for `mediaflow
//! pipeline check`; building the declared stages' handlers from it comes with running pipelines
//! from their files.

use mediaflow_image_worker::ImageWorkerConfig;
use mediaflow_pipeline::kinds::{LinkingKinds, ports, settings};
use mediaflow_pipeline::{KindCatalog, Problem, StageDecl};
use mediaflow_video_worker::VideoWorkerConfig;

/// Every stage kind of the platform.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlatformKinds;

/// The media kinds: one output port, `out`, for their result events.
const MEDIA: [&str; 2] = ["image", "video"];

impl KindCatalog for PlatformKinds {
    fn kinds(&self) -> Vec<String> {
        let mut kinds = LinkingKinds.kinds();
        kinds.extend(MEDIA.iter().map(|k| (*k).to_owned()));
        kinds
    }

    fn check(&self, stage: &StageDecl) -> Option<Vec<Problem>> {
        let out = ["out".to_owned()];
        let checked = |r: Result<(), String>| {
            r.err().map(|e| {
                Problem::at(
                    stage.config_at(),
                    format!("stage `{}`: {e}", stage.name.value),
                )
            })
        };
        let settings_problem = match stage.kind.value.as_str() {
            "image" => match settings::<ImageWorkerConfig>(stage) {
                Ok(c) => checked(c.check()),
                Err(p) => Some(p),
            },
            "video" => match settings::<VideoWorkerConfig>(stage) {
                Ok(c) => checked(c.check()),
                Err(p) => Some(p),
            },
            _ => return LinkingKinds.check(stage),
        };
        Some(
            settings_problem
                .into_iter()
                .chain(ports(stage, &out, false))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_pipeline_is_valid_and_media_settings_are_checked() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../pipelines/default.yaml");
        let text = std::fs::read_to_string(file).unwrap();
        mediaflow_pipeline::parse(&text, file, &PlatformKinds).unwrap();
        let bad = text.replace(
            "    version: 2\n",
            "    version: 2\n    config:\n      max_sidee: 10\n",
        );
        let err = mediaflow_pipeline::parse(&bad, "bad.yaml", &PlatformKinds).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `max_sidee`"),
            "{err}"
        );
    }
}
