//! OpenAPI schemas of labels, label changes and label filters: the same bounds
//! `kiln_types::labels` checks, so generated clients and fuzzers know them.

use kiln_types::labels::{MAX_KEY_BYTES, MAX_LABELS, MAX_VALUE_CHARS};
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, SchemaType, Type,
};
use utoipa::openapi::{Object, RefOr, Schema};

fn key() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!(
            "^[A-Za-z0-9][A-Za-z0-9._/-]{{0,{}}}$",
            MAX_KEY_BYTES - 1
        )))
        .build()
}

/// No control characters (C0, DEL, C1), at most [`MAX_VALUE_CHARS`].
const VALUE_CHARS: &str = "[^\\u0000-\\u001f\\u007f-\\u009f]";

fn value() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .max_length(Some(MAX_VALUE_CHARS))
        .pattern(Some(format!("^{VALUE_CHARS}*$")))
        .build()
}

/// `{"key": "value", …}`: at most 64.
pub fn labels() -> impl Into<RefOr<Schema>> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(key()))
        .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(Schema::Object(
            value(),
        )))))
        .max_properties(Some(MAX_LABELS))
        .description(Some(
            "Labels: keys of 1-128 letters, digits, '.', '_', '-' or '/' starting with a \
             letter or digit; values of at most 256 characters, no control characters; at \
             most 64.",
        ))
        .build()
}

/// `{"key": "value" | null, …}`: set or remove.
pub fn label_changes() -> impl Into<RefOr<Schema>> {
    let nullable_value = ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .max_length(Some(MAX_VALUE_CHARS))
        .pattern(Some(format!("^{VALUE_CHARS}*$")))
        .build();
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(key()))
        .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(Schema::Object(
            nullable_value,
        )))))
        .description(Some(
            "Labels to set (a value) or remove (null); the result holds at most 64.",
        ))
        .build()
}

/// `label` query parameters: `key=value` or `key`, at most 16.
pub fn label_filters() -> impl Into<RefOr<Schema>> {
    let filter = ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!(
            "^[A-Za-z0-9][A-Za-z0-9._/-]{{0,{}}}(={VALUE_CHARS}{{0,{MAX_VALUE_CHARS}}})?$",
            MAX_KEY_BYTES - 1
        )))
        .build();
    ArrayBuilder::new()
        .items(filter)
        .max_items(Some(16))
        .build()
}
