//! One log event as one line of text, `message key=value …`: how the faces that hand events to
//! their host's logging (the C callback, Node's `setLogger`) show them. Secrets are never logged
//! as fields, so the line is safe to pass on.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};

/// The message and fields of `event`, as `message key=value …`.
pub fn event_line(event: &tracing::Event<'_>) -> String {
    let mut line = Line::default();
    event.record(&mut line);
    if line.message.is_empty() {
        line.fields.trim_start().to_string()
    } else {
        line.message + &line.fields
    }
}

#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}
