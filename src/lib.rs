//! lockstep: the validation runner (suites, checks, localization, reports) and its CLI.
