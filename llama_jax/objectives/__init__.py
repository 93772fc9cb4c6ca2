"""Model-free training objectives: plain functions of arrays that return `(loss, metrics)`."""
