//! The `matrix` text of a table: a header row of destinations (its first cell
//! is ignored), then one row per source with one `.` or `X` per column.
//! Cells are separated by any whitespace; blank lines are ignored.

use super::error::{Location, Problem, ScenarioErrors};
use super::scenario::{Endpoint, PortRef, Protocol, Table, Verdict};

/// Parses `text`, recording every problem (with its matrix line) in `errors`.
/// Checks the shape only: that names exist at the step is checked when the
/// table is expanded into probes.
pub fn parse(
    text: &str,
    protocol: Protocol,
    port: PortRef,
    (step, index): (usize, usize),
    errors: &mut ScenarioErrors,
) -> Option<Table> {
    let at = |line: usize| Location::Matrix { step, index, line };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.split_whitespace().collect::<Vec<_>>()))
        .filter(|(_, cells)| !cells.is_empty());
    let before = errors.0.len();

    let Some((header_line, header)) = lines.next() else {
        errors.push(
            Location::Expect { step, index },
            Problem::MatrixShape("the matrix is empty"),
        );
        return None;
    };
    let mut columns = Vec::new();
    for name in &header[1..] {
        match endpoint(name) {
            Ok(ep) if columns.contains(&ep) => errors.push(
                at(header_line),
                Problem::DuplicateEndpoint {
                    what: "column",
                    name: ep,
                },
            ),
            Ok(ep) => columns.push(ep),
            Err(problem) => errors.push(at(header_line), problem),
        }
    }
    if header.len() == 1 {
        errors.push(
            at(header_line),
            Problem::MatrixShape("the header row names no destination"),
        );
    }

    let mut rows: Vec<(Endpoint, Vec<Verdict>)> = Vec::new();
    for (line, cells) in lines {
        let source = match endpoint(cells[0]) {
            Ok(Endpoint::Service(svc)) => {
                errors.push(at(line), Problem::ServiceAsSource(Endpoint::Service(svc)));
                continue;
            }
            Ok(ep) if rows.iter().any(|(r, _)| r == &ep) => {
                errors.push(
                    at(line),
                    Problem::DuplicateEndpoint {
                        what: "row",
                        name: ep,
                    },
                );
                continue;
            }
            Ok(ep) => ep,
            Err(problem) => {
                errors.push(at(line), problem);
                continue;
            }
        };
        if cells.len() != header.len() {
            errors.push(
                at(line),
                Problem::WrongCellCount {
                    row: cells[0].to_owned(),
                    expected: header.len() - 1,
                    found: cells.len() - 1,
                },
            );
            continue;
        }
        let mut verdicts = Vec::with_capacity(cells.len() - 1);
        for (cell, column) in cells[1..].iter().zip(&header[1..]) {
            let verdict = match *cell {
                "." => Verdict::Allow,
                "X" => Verdict::Deny,
                other => {
                    errors.push(
                        at(line),
                        Problem::BadCell {
                            row: cells[0].to_owned(),
                            column: (*column).to_owned(),
                            cell: other.to_owned(),
                        },
                    );
                    continue;
                }
            };
            if verdict == Verdict::Deny && Endpoint::parse(column) == Some(source.clone()) {
                errors.push(at(line), Problem::SelfCell(source.clone()));
            }
            verdicts.push(verdict);
        }
        rows.push((source, verdicts));
    }
    if rows.is_empty() && errors.0.len() == before {
        errors.push(
            at(header_line),
            Problem::MatrixShape("the matrix has no source rows"),
        );
    }
    (errors.0.len() == before).then_some(Table {
        protocol,
        port,
        columns,
        rows,
    })
}

/// Parses a cell name.
pub fn endpoint(text: &str) -> Result<Endpoint, Problem> {
    Endpoint::parse(text).ok_or_else(|| Problem::BadEndpoint(text.to_owned()))
}
