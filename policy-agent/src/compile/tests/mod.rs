//! Tests of the compiler against the NetworkPolicy v1 spec, reading the
//! compiled maps the way the classifier does.

mod fixture;
mod invalid;
mod property;
mod scale;
mod spec;
