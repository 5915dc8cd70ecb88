//! The status page at `/` on the admin listener: every plugin's state,
//! build, loads and live counters, refreshed every 2 s from `/plugins`.
//!
//! One static document, no external resources. Everything shown comes from
//! `/plugins` and is put in the page with `textContent`, never as markup, so
//! a plugin's name or an error text cannot inject anything.

/// The page, served as is.
pub const STATUS_PAGE: &str = include_str!("page.html");
