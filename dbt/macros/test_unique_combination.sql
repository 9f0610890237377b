{#- Generic test: the combination of `columns` is unique (the project installs no packages, so this
    stands in for dbt_utils.unique_combination_of_columns). -#}
{% test unique_combination(model, columns) %}

select
    {{ columns | join(', ') }},
    count(*) as duplicates
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1

{% endtest %}
