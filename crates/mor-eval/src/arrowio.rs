//! Reading Hugging Face `datasets` shards (Arrow IPC *stream* files) and gzipped JSONL into
//! JSON rows, so task builders work on plain `serde_json` values.

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt32Type, UInt64Type, UInt8Type};
use arrow_array::Array;
use arrow_schema::DataType;
use serde_json::{Map, Value};
use std::io::BufRead;
use std::path::Path;

/// One value of an Arrow array as JSON (strings, integers, floats, booleans, lists, structs).
pub fn value_at(a: &dyn Array, i: usize) -> Result<Value> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match a.data_type() {
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float32 => a.as_primitive::<Float32Type>().value(i).into(),
        DataType::Float64 => a.as_primitive::<Float64Type>().value(i).into(),
        DataType::List(_) => {
            let v = a.as_list::<i32>().value(i);
            Value::Array((0..v.len()).map(|j| value_at(v.as_ref(), j)).collect::<Result<_>>()?)
        }
        DataType::LargeList(_) => {
            let v = a.as_list::<i64>().value(i);
            Value::Array((0..v.len()).map(|j| value_at(v.as_ref(), j)).collect::<Result<_>>()?)
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut m = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), value_at(col.as_ref(), i)?);
            }
            Value::Object(m)
        }
        other => bail!("unsupported Arrow column type {other}"),
    })
}

/// All rows of an Arrow IPC stream file as JSON objects (column name → value).
pub fn read_arrow_stream(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = arrow_ipc::reader::StreamReader::try_new_buffered(f, None)
        .with_context(|| format!("{}: not an Arrow IPC stream", path.display()))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: corrupt Arrow record batch", path.display()))?;
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            let mut m = Map::new();
            for (field, col) in schema.fields().iter().zip(batch.columns()) {
                let v = value_at(col.as_ref(), i).with_context(|| format!("{}: column {}", path.display(), field.name()))?;
                m.insert(field.name().clone(), v);
            }
            rows.push(m);
        }
    }
    Ok(rows)
}

/// Lines of a JSONL file (optionally gzip-compressed: `.gz`) as JSON values.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    let mut out = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}: reading line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| format!("{}: line {} is not valid JSON", path.display(), n + 1))?);
    }
    Ok(out)
}
