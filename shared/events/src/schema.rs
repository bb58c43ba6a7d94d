//! The JSON Schemas in `schemas/`, compiled in, and validation of payloads against them.

use serde_json::Value;

/// The schema document for an event type, if mediaflow defines one.
pub fn document(event_type: &str) -> Option<&'static str> {
    match event_type {
        "mediaflow.media.uploaded" => Some(include_str!(
            "../../../schemas/mediaflow.media.uploaded.json"
        )),
        "mediaflow.image.processed" => Some(include_str!(
            "../../../schemas/mediaflow.image.processed.json"
        )),
        "mediaflow.video.processed" => Some(include_str!(
            "../../../schemas/mediaflow.video.processed.json"
        )),
        "mediaflow.media.processed" => Some(include_str!(
            "../../../schemas/mediaflow.media.processed.json"
        )),
        "mediaflow.work.item" => Some(include_str!("../../../schemas/mediaflow.work.item.json")),
        "mediaflow.item.processed" => Some(include_str!(
            "../../../schemas/mediaflow.item.processed.json"
        )),
        "mediaflow.user.signed-up" => Some(include_str!(
            "../../../schemas/mediaflow.user.signed-up.json"
        )),
        "mediaflow.user.verified" => Some(include_str!(
            "../../../schemas/mediaflow.user.verified.json"
        )),
        "mediaflow.user.code-requested" => Some(include_str!(
            "../../../schemas/mediaflow.user.code-requested.json"
        )),
        "mediaflow.notification.registered" => Some(include_str!(
            "../../../schemas/mediaflow.notification.registered.json"
        )),
        "mediaflow.sms.requested" => Some(include_str!(
            "../../../schemas/mediaflow.sms.requested.json"
        )),
        "mediaflow.image.redacted" => Some(include_str!(
            "../../../schemas/mediaflow.image.redacted.json"
        )),
        "mediaflow.media.completed" => Some(include_str!(
            "../../../schemas/mediaflow.media.completed.json"
        )),
        "mediaflow.batch.completed" => Some(include_str!(
            "../../../schemas/mediaflow.batch.completed.json"
        )),
        "mediaflow.report" => Some(include_str!("../../../schemas/mediaflow.report.json")),
        "mediaflow.late" => Some(include_str!("../../../schemas/mediaflow.late.json")),
        "mediaflow.dead-letter" => {
            Some(include_str!("../../../schemas/mediaflow.dead-letter.json"))
        }
        _ => None,
    }
}

/// Every event type that has a schema.
pub const EVENT_TYPES: &[&str] = &[
    "mediaflow.media.uploaded",
    "mediaflow.image.processed",
    "mediaflow.video.processed",
    "mediaflow.media.processed",
    "mediaflow.work.item",
    "mediaflow.item.processed",
    "mediaflow.user.signed-up",
    "mediaflow.user.verified",
    "mediaflow.user.code-requested",
    "mediaflow.notification.registered",
    "mediaflow.sms.requested",
    "mediaflow.image.redacted",
    "mediaflow.media.completed",
    "mediaflow.batch.completed",
    "mediaflow.report",
    "mediaflow.late",
    "mediaflow.dead-letter",
];

/// Checks `data` against the schema of `event_type`; the error lists every violation.
pub fn validate(event_type: &str, data: &Value) -> Result<(), String> {
    let doc = document(event_type).ok_or_else(|| format!("no schema for `{event_type}`"))?;
    let schema: Value =
        serde_json::from_str(doc).map_err(|e| format!("schema of `{event_type}`: {e}"))?;
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| format!("schema of `{event_type}` does not compile: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(data)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "`{event_type}` payload violates its schema: {}",
            errors.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventData;
    use crate::media::{ImageProcessed, MediaUploaded};

    fn sample<T: EventData>(data: &T) -> Value {
        serde_json::to_value(data).unwrap()
    }

    #[test]
    fn every_schema_compiles_and_matches_its_file_name() {
        for ty in EVENT_TYPES {
            let schema: Value = serde_json::from_str(document(ty).unwrap()).unwrap();
            assert_eq!(schema["title"], *ty);
            jsonschema::validator_for(&schema).unwrap();
        }
    }

    #[test]
    fn rust_payloads_match_their_schemas() {
        let uploaded = crate::media::tests::uploaded();
        validate(MediaUploaded::TYPE, &sample(&uploaded)).unwrap();
        let mut no_name = uploaded;
        no_name.filename = None;
        validate(MediaUploaded::TYPE, &sample(&no_name)).unwrap();
        validate(
            ImageProcessed::TYPE,
            &sample(&crate::media::tests::image_processed()),
        )
        .unwrap();
        let video = crate::video::tests::video_processed();
        validate(crate::VideoProcessed::TYPE, &sample(&video)).unwrap();
        let mut v = sample(&video);
        v["probe"]["video"]["rotation"] = 45.into();
        assert!(validate(crate::VideoProcessed::TYPE, &v).is_err());
        validate(
            crate::MediaProcessed::TYPE,
            &sample(&crate::media::tests::processed()),
        )
        .unwrap();
        validate(
            crate::WorkItem::TYPE,
            &sample(&crate::item::tests::work_item()),
        )
        .unwrap();
        validate(
            crate::ItemProcessed::TYPE,
            &sample(&crate::item::tests::item_processed()),
        )
        .unwrap();
        let u = crate::user::tests::signed_up();
        validate(crate::UserSignedUp::TYPE, &sample(&u)).unwrap();
        let mut no_phone = u.clone();
        no_phone.user.phone = None;
        validate(crate::UserSignedUp::TYPE, &sample(&no_phone)).unwrap();
        let v = crate::user::tests::verified();
        validate(crate::UserVerified::TYPE, &sample(&v)).unwrap();
        let c = crate::user::tests::code_requested();
        validate(crate::CodeRequested::TYPE, &sample(&c)).unwrap();
        let r = crate::user::tests::registered();
        validate(crate::NotificationRegistered::TYPE, &sample(&r)).unwrap();
        let sms = crate::user::tests::sms();
        validate(crate::SmsRequested::TYPE, &sample(&sms)).unwrap();
        let mut dead = crate::dead_letter::tests::dead_letter();
        validate(crate::DeadLetter::TYPE, &sample(&dead)).unwrap();
        dead.event = None;
        dead.raw = Some(crate::RawMessage {
            value: "not json".into(),
            value_len: 8,
            headers: vec![("h".into(), "v".into())],
        });
        validate(crate::DeadLetter::TYPE, &sample(&dead)).unwrap();
    }

    #[test]
    fn schemas_reject_what_the_types_forbid() {
        let mut v = sample(&crate::media::tests::uploaded());
        v["kind"] = "audio".into();
        assert!(validate(MediaUploaded::TYPE, &v).is_err());

        let mut v = sample(&crate::media::tests::uploaded());
        v["filename"] = "../etc/passwd".into();
        assert!(validate(MediaUploaded::TYPE, &v).is_err());

        let mut v = sample(&crate::user::tests::signed_up());
        v["phone"] = "0163 296 0961".into();
        assert!(validate(crate::UserSignedUp::TYPE, &v).is_err());

        let mut v = sample(&crate::media::tests::image_processed());
        v.as_object_mut().unwrap().remove("stage_version");
        let err = validate(ImageProcessed::TYPE, &v).unwrap_err();
        assert!(err.contains("stage_version"), "{err}");
    }
}
