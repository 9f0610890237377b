{#- Small cross-database helpers (DuckDB and Postgres). -#}

{#- A delimited string as an array; use as unnest({{ split_to_array(...) }}) to get one row per part. -#}
{% macro split_to_array(column, delimiter_sql) -%}
    {{ return(adapter.dispatch('split_to_array', 'oppsync')(column, delimiter_sql)) }}
{%- endmacro %}

{% macro default__split_to_array(column, delimiter_sql) -%}
    string_to_array({{ column }}, {{ delimiter_sql }})
{%- endmacro %}

{% macro duckdb__split_to_array(column, delimiter_sql) -%}
    string_split({{ column }}, {{ delimiter_sql }})
{%- endmacro %}


{#- A select-list expression yielding one row per day (a date) from start_date to end_date inclusive. -#}
{% macro day_series(start_date, end_date) -%}
    {{ return(adapter.dispatch('day_series', 'oppsync')(start_date, end_date)) }}
{%- endmacro %}

{% macro default__day_series(start_date, end_date) -%}
    cast(generate_series(cast({{ start_date }} as timestamp), cast({{ end_date }} as timestamp), interval '1 day') as date)
{%- endmacro %}

{% macro duckdb__day_series(start_date, end_date) -%}
    cast(unnest(generate_series(cast({{ start_date }} as timestamp), cast({{ end_date }} as timestamp), interval '1 day')) as date)
{%- endmacro %}
