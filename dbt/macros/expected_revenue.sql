{#- The probability (0-100) assumed for an opportunity without one (seed 003: an Autotask probability left
    empty "throws off" expected revenue): var('default_probability_by_connection')[connection], else
    var('default_probability'), else null (no expected revenue). Set from oppsync.yaml's `mart:` block and
    each connection's `default_probability` (lib/dbt_env.dbt_vars). A SQL expression over connection_column. -#}
{% macro default_probability(connection_column) -%}
    {%- set by_connection = var('default_probability_by_connection', {}) -%}
    {%- if by_connection is not mapping -%}{%- set by_connection = {} -%}{%- endif -%}
    {%- set overall = var('default_probability', none) -%}
    {%- set fallback = 'cast(' ~ ('null' if overall is none else (overall | float)) ~ ' as double precision)' -%}
    {%- set whens = [] -%}
    {%- for name, probability in by_connection.items() -%}
        {%- set _ = whens.append(
            "when " ~ connection_column ~ " = '" ~ (name | replace("'", "''")) ~ "' then cast("
            ~ (probability | float) ~ " as double precision)"
        ) -%}
    {%- endfor -%}
    {%- if whens -%}
        {{ return('case ' ~ (whens | join(' ')) ~ ' else ' ~ fallback ~ ' end') }}
    {%- endif -%}
    {{ return(fallback) }}
{%- endmacro %}
