with

source as (

    select * from {{ source('oppsync', 'connections') }}

),

renamed as (

    select
        cast(name as text) as connection,
        cast(crm as text) as crm,
        -- stage keys / labels joined by the unit separator chr(31); '' means no stage rule
        cast(nullif(qualified_stages, '') as text) as qualified_stages,
        cast(qualified_min_probability as double precision) as qualified_min_probability,
        cast(updated_at as timestamp) as updated_at

    from source

)

select * from renamed
