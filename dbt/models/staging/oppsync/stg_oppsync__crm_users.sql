with

source as (

    select * from {{ source('oppsync', 'crm_users') }}

),

renamed as (

    select
        cast(connection as text) as connection,
        cast(crm_user_id as text) as crm_user_id,
        cast(name as text) as crm_user_name,
        cast(email as text) as email,
        cast(kind as text) as crm_user_kind,
        cast(active as boolean) as is_active,
        cast(alt_ids as text) as alt_ids,
        cast(updated_at as timestamp) as updated_at

    from source

)

select * from renamed
